#!/usr/bin/env bash
# What the fluxbatch workflow (fluxbatch.yml) runs, one subcommand per step. Copy it to
# .github/fluxbatch-ci.sh beside .github/workflows/fluxbatch.yml; docs/ci.md explains both.
#
#   review BASE DIR        a comment per recipe: what the change renders, removes, costs
#   comment DIR            post them on the pull request: one comment per recipe, updated
#   render-change BASE DIR render the change (within $BUDGET) and draw before/after sheets
#   shards                 the shards of the render on main, as a JSON list ("1/3", ...)
#   render-shard I/N       render shard I of N of every recipe
#   collect DIR...         adopt the shards' images into $OUT, paying nothing
#
# Settings come from the environment: RECIPES (a glob of the recipes), OUT (their output
# root, kept between runs), BUDGET (dollars one render may spend), SHARD_SIZE (images per
# shard) and MAX_SHARDS; for `comment`, GH_TOKEN, GITHUB_REPOSITORY and PR.
set -euo pipefail

: "${RECIPES:=recipes/*.yaml}" "${OUT:=renders}" "${BUDGET:=10}"
: "${SHARD_SIZE:=500}" "${MAX_SHARDS:=8}"
CAP=24 # tasks in flight per account: shards running at once share it

recipes() {
  # shellcheck disable=SC2086 # (RECIPES is a glob)
  for recipe in $RECIPES; do
    [ -f "$recipe" ] && printf '%s\n' "$recipe"
  done
}

name_of() { # a file name for a recipe's comment or sheet: recipes/shop.yaml -> recipes-shop
  local name="${1%.*}"
  printf '%s' "${name//\//-}"
}

changes() { # whether the plan diff of a recipe (JSON on stdin) has any image that differs
  python3 -c 'import json, sys
s = json.load(sys.stdin)["summary"]
sys.exit(0 if any(s[k] for k in ("added", "changed", "moved", "removed")) else 1)'
}

review() {
  local base="$1" dir="$2" recipe name
  mkdir -p "$dir"
  while read -r recipe; do
    name="$(name_of "$recipe")"
    if fluxbatch plan "$recipe" --out "$OUT" --diff "$base" --format json | changes; then
      fluxbatch plan "$recipe" --out "$OUT" --diff "$base" --format markdown >"$dir/$name.md"
    else # said only where a comment already stands (the change was undone)
      fluxbatch plan "$recipe" --out "$OUT" --diff "$base" --format markdown \
        >"$dir/$name.unchanged.md"
    fi
  done < <(recipes)
}

comment() {
  local dir="$1" file marker id api="repos/$GITHUB_REPOSITORY/issues"
  for file in "$dir"/*.md; do
    [ -f "$file" ] || continue
    marker="$(head -n 1 "$file")" # <!-- fluxbatch plan --diff: RECIPE -->: one per recipe
    id="$(gh api --paginate "$api/$PR/comments" \
      --jq ".[] | select(.body | startswith($(jq -Rn --arg m "$marker" '$m'))) | .id" |
      head -n 1)"
    if [ -n "$id" ]; then
      gh api --method PATCH "$api/comments/$id" -F "body=@$file" >/dev/null
    elif [[ "$file" != *.unchanged.md ]]; then
      gh api --method POST "$api/$PR/comments" -F "body=@$file" >/dev/null
    fi
  done
}

render_change() {
  local base="$1" dir="$2" recipe name
  mkdir -p "$dir"
  while read -r recipe; do
    fluxbatch plan "$recipe" --out "$OUT" --diff "$base" --format json | changes || continue
    name="$(name_of "$recipe")"
    fluxbatch render "$recipe" --out "$OUT" --budget "$BUDGET" -q
    fluxbatch gallery "$recipe" --out "$OUT" --diff "$base" -o "$dir/$name.html" \
      --png "$dir/$name.png"
  done < <(recipes)
}

shards() {
  local total=0 recipe count
  while read -r recipe; do
    count="$(fluxbatch plan "$recipe" --out "$OUT" --json |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["summary"]["to_render"])')"
    total=$((total + count))
  done < <(recipes)
  local n=$(((total + SHARD_SIZE - 1) / SHARD_SIZE))
  n=$((n < 1 ? 1 : n > MAX_SHARDS ? MAX_SHARDS : n))
  python3 -c 'import json, sys; n = int(sys.argv[1])
print(json.dumps([f"{i}/{n}" for i in range(1, n + 1)]))' "$n"
}

render_shard() {
  local shard="$1" recipe n="${1#*/}"
  local jobs=$((CAP / n > 0 ? CAP / n : 1))
  while read -r recipe; do
    fluxbatch render "$recipe" --out "$OUT" --shard "$shard" -j "$jobs" --budget "$BUDGET" -q
  done < <(recipes)
}

collect() {
  local recipe
  while read -r recipe; do
    fluxbatch merge "$recipe" --out "$OUT" "$@"
    fluxbatch status "$recipe" --out "$OUT"
  done < <(recipes)
}

command="${1:?usage: fluxbatch-ci.sh review|comment|render-change|shards|render-shard|collect}"
shift
case "$command" in
review) review "$@" ;;
comment) comment "$@" ;;
render-change) render_change "$@" ;;
shards) shards ;;
render-shard) render_shard "$@" ;;
collect) collect "$@" ;;
*)
  echo "fluxbatch-ci.sh: unknown command $command" >&2
  exit 2
  ;;
esac
