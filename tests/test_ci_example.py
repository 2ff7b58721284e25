"""The example GitHub Actions workflow (examples/ci/fluxbatch.yml) run step by step, as Actions
would run it, in temporary git repositories against the bundled emulator: a pull request
gets one comment per recipe, updated in place; labelled, its change is rendered and drawn
before and after; on main, the recipes are rendered in shards into the cached output root.

Only the `run:` steps run, with their `${{ }}` expressions replaced from a table (an
expression the table does not know fails the test, so the workflow cannot drift from it).
The actions are played by the test: checkout (a fresh clone per job), the cache and the
artifacts (folders, hidden files left out unless the step includes them), and `gh` (a
script that keeps the pull request's comments in a JSON file and answers with jq).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.helpers import ROOT, SHOP_RECIPE, build_file_tree, commit, git

WORKFLOW = ROOT / "examples" / "ci" / "fluxbatch.yml"
SCRIPT = ROOT / "examples" / "ci" / "fluxbatch-ci.sh"


# `gh api` as the comment step calls it, on a JSON file of the pull request's comments
FAKE_GH = """\
#!/usr/bin/env python3
import json, os, subprocess, sys
store = os.environ["FAKE_GH_COMMENTS"]
comments = json.load(open(store)) if os.path.exists(store) else []
args = sys.argv[2:]  # after `api`
method, jq, body, path = "GET", None, None, None
while args:
    arg = args.pop(0)
    if arg == "--method": method = args.pop(0)
    elif arg == "--jq": jq = args.pop(0)
    elif arg == "-F": body = open(args.pop(0).removeprefix("body=@")).read()
    elif arg == "--paginate": pass
    else: path = arg
with open(os.environ["FAKE_GH_LOG"], "a") as log:
    log.write(f"{method} {path}\\n")
if method == "GET":
    out = subprocess.run(["jq", "-r", jq], input=json.dumps(comments), text=True,
                         capture_output=True, check=True).stdout
    sys.stdout.write(out)
elif method == "POST":
    comments.append({"id": 1000 + len(comments), "body": body})
else:
    number = int(path.rsplit("/", 1)[1])
    next(c for c in comments if c["id"] == number)["body"] = body
json.dump(comments, open(store, "w"))
"""


class Actions:
    """The workflow's jobs, run in folders under `base` as GitHub Actions would run them."""

    def __init__(self, base: Path, origin: Path, expressions: Mapping[str, Any],
                 env: Mapping[str, str]) -> None:
        self.base, self.origin = base, origin
        self.expressions = dict(expressions)
        self.env = dict(env)
        self.workflow = yaml.safe_load(WORKFLOW.read_text())
        self.cache = base / "cache"
        self.artifacts = base / "artifacts"
        self.runs = 0

    def expand(self, text: str, more: Mapping[str, Any] | None = None) -> str:
        known = {**self.expressions, **(more or {})}

        def value(found: re.Match[str]) -> str:
            expression = found[1].strip()
            if expression not in known:
                pytest.fail(f"the workflow uses ${{{{ {expression} }}}}, which this test "
                            "does not know")
            return str(known[expression])

        return re.sub(r"\$\{\{(.*?)\}\}", value, text)

    def job(self, name: str, branch: str, more: Mapping[str, Any] | None = None) -> Path:
        """Run job `name` on a fresh clone of `branch`; return its folder."""
        self.runs += 1
        folder = self.base / f"run-{self.runs}-{name}"
        git(self.base, "clone", "-q", "--branch", branch, str(self.origin), str(folder))
        spec = self.workflow["jobs"][name]
        context = dict(more or {})
        for step in spec["steps"]:
            condition = step.get("if")
            if condition is not None and not self.expressions[condition]:
                continue
            if "uses" in step:
                self.action(step, folder, context)
            elif step.get("id") != "install":  # (fluxbatch is installed: this checkout's)
                self.run(step, spec, folder, context)
        for output, expression in spec.get("outputs", {}).items():
            self.expressions[f"needs.{name}.outputs.{output}"] = self.expand(expression, context)
        return folder

    def action(self, step: dict[str, Any], folder: Path, context: Mapping[str, Any]) -> None:
        uses, options = step["uses"], step.get("with", {})
        target = folder / options.get("path", "")
        if uses.startswith(("actions/checkout@", "actions/setup-python@")):
            return
        if uses.startswith("actions/cache/restore@"):
            if self.cache.exists():
                shutil.copytree(self.cache, target, dirs_exist_ok=True)
        elif uses.startswith("actions/cache/save@"):
            shutil.rmtree(self.cache, ignore_errors=True)
            shutil.copytree(target, self.cache)
        elif uses.startswith("actions/upload-artifact@"):
            hidden = options.get("include-hidden-files", False)
            shutil.copytree(target, self.artifacts / self.expand(options["name"], context),
                            ignore=None if hidden else shutil.ignore_patterns(".*"))
        elif uses.startswith("actions/download-artifact@"):
            for artifact in sorted(self.artifacts.iterdir()):
                if fnmatch.fnmatch(artifact.name, options["pattern"]):
                    shutil.copytree(artifact, target / artifact.name)
        else:
            pytest.fail(f"the workflow uses {uses}, which this test does not play")

    def run(self, step: dict[str, Any], spec: dict[str, Any], folder: Path,
            context: dict[str, Any]) -> None:
        output = folder.parent / f"{folder.name}.output"
        output.write_text("")
        env = {**os.environ, **self.env, "GITHUB_OUTPUT": str(output)}
        for scope in (self.workflow.get("env", {}), spec.get("env", {}), step.get("env", {})):
            env.update({k: self.expand(str(v), context) for k, v in scope.items()
                        if k not in self.env})
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                               self.expand(step["run"], context)], cwd=folder, env=env,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{step.get('name', step['run'])}:\n{done.stdout}" \
            f"{done.stderr}"
        if "id" in step:
            for line in output.read_text().splitlines():
                name, _, value = line.partition("=")
                context[f"steps.{step['id']}.outputs.{name}"] = value


@pytest.fixture
def actions(tmp_path: Path) -> Actions:
    if shutil.which("jq") is None:
        pytest.skip("the comment step's `gh api --jq` is played with jq, which is not installed")
    work = build_file_tree(tmp_path / "work", {
        "recipes/shop.yaml": SHOP_RECIPE, "recipes/subjects.txt": "teapot\nkettle\nmug\n",
        ".github/workflows/fluxbatch.yml": WORKFLOW.read_text(),
        ".github/fluxbatch-ci.sh": SCRIPT.read_text()})
    (work / ".github" / "fluxbatch-ci.sh").chmod(0o755)
    git(work, "init", "-q")
    commit(work, "recipes")
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(origin))
    bin_dir = build_file_tree(tmp_path / "bin", {"gh": FAKE_GH})
    (bin_dir / "gh").chmod(0o755)
    fluxbatch = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}{os.pathsep}{fluxbatch}{os.pathsep}{os.environ['PATH']}",
           "FAKE_GH_COMMENTS": str(tmp_path / "comments.json"),
           "FAKE_GH_LOG": str(tmp_path / "gh.log"), "GITHUB_REPOSITORY": "studio/shop",
           "SHARD_SIZE": "3"}  # (the one setting changed: a few images make several shards)
    expressions = {
        "github.base_ref": "main", "github.run_id": 1, "github.token": "not-a-token",
        "github.event.pull_request.number": 7, "secrets.BFL_API_KEY": "",
        "github.ref": "refs/heads/main", "always()": True,
        "github.event.pull_request.head.repo.full_name == github.repository": True}
    return Actions(tmp_path, origin, expressions, env)


def comments(tmp_path: Path) -> list[dict[str, Any]]:
    return list(json.loads((tmp_path / "comments.json").read_text()))


def test_the_workflow_reviews_renders_and_keeps_one_comment_per_recipe(
        actions: Actions, tmp_path: Path) -> None:
    # main: rendered in shards, adopted into the cached output root
    actions.job("shards", "main")
    listed = json.loads(actions.expressions["needs.shards.outputs.shards"])
    actions.expressions["fromJSON(needs.shards.outputs.shards)"] = listed
    assert listed == ["1/3", "2/3", "3/3"]  # 7 images, 3 per shard
    assert actions.workflow["jobs"]["render"]["strategy"]["matrix"]["shard"] == \
        "${{ fromJSON(needs.shards.outputs.shards) }}"
    for index, shard in enumerate(listed):
        actions.job("render", "main", {"matrix.shard": shard, "strategy.job-index": index})
    collected = actions.job("collect", "main")
    assert sorted(p.relative_to(collected / "renders").as_posix()
                  for p in (collected / "renders").rglob("*.png")) == [
        "hero/lighthouse.png", "mugs/kettle-1.png", "mugs/kettle-2.png", "mugs/mug-1.png",
        "mugs/mug-2.png", "mugs/teapot-1.png", "mugs/teapot-2.png"]

    # a pull request: add a value, remove one
    change = tmp_path / "change"
    git(tmp_path, "clone", "-q", str(actions.origin), str(change))
    git(change, "checkout", "-q", "-b", "cups")
    (change / "recipes" / "subjects.txt").write_text("teapot\nkettle\ncup\n")
    commit(change, "cups, not mugs")
    git(change, "push", "-q", "origin", "cups")
    review = actions.job("review", "cups")
    body = (review / "comments" / "recipes-shop.md").read_text()
    assert body.splitlines()[:5] == [
        "<!-- fluxbatch plan --diff: recipes/shop.yaml -->",
        f"### fluxbatch: `shop` (`recipes/shop.yaml`) against `origin/main` "
        f"({git(change, 'rev-parse', '--short=7', 'main').strip()})", "",
        "This change renders **2 images (\\~\\$0.080)**: 2 new; removes 2; 5 unchanged.", ""]
    assert comments(tmp_path) == [{"id": 1000, "body": body}]

    # pushed again: the same comment, updated in place
    (change / "recipes" / "subjects.txt").write_text("teapot\ncup\n")
    commit(change, "no kettle either")
    git(change, "push", "-q", "origin", "cups")
    actions.job("review", "cups")
    assert [c["id"] for c in comments(tmp_path)] == [1000]
    assert "removes 4; 3 unchanged." in comments(tmp_path)[0]["body"]
    assert (tmp_path / "gh.log").read_text().splitlines() == [
        "GET repos/studio/shop/issues/7/comments", "POST repos/studio/shop/issues/7/comments",
        "GET repos/studio/shop/issues/7/comments", "PATCH repos/studio/shop/issues/comments/1000"]

    # labelled `render`: the change rendered within the budget, and drawn before and after
    rendered = actions.job("render-change", "cups")
    sheet = actions.artifacts / "before-after" / "recipes-shop.png"
    assert Image.open(sheet).width > 300
    page = (actions.artifacts / "before-after" / "recipes-shop.html").read_text()
    assert page.count('data-state="not in the store"') == 0  # main's images came from the cache
    assert page.count('data-state="not rendered yet"') == 0
    assert (rendered / "renders" / "mugs" / "cup-1.png").exists()

