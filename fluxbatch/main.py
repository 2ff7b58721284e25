"""The command line: parse arguments and dispatch. Nothing else happens here.

`main(argv) -> int` is the one error boundary: a `FluxbatchError` prints its message once and
returns its exit code; anything unexpected prints one line, writes the traceback to a log
file whose path is printed, and returns 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from fluxbatch.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ConfigError,
    FluxbatchError,
    RecipeError,
    UsageError,
    without_key_parameters,
)
from fluxbatch.version import __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more")
    return value


def _shard(text: str) -> tuple[int, int] | str:
    """`--shard I/N`, or `auto` (read from the environment once the command runs: see
    `_shard_of`); a bad one is a usage error (exit 2), found before anything is read."""
    from fluxbatch.selection import parse_shard

    if text == "auto":
        return text
    try:
        return parse_shard(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--shard ")) from None


def _shard_of(args: argparse.Namespace) -> tuple[int, int] | None:
    """The shard `--shard` names; for `auto`, the one the environment names (a Kubernetes
    Indexed Job, the emitted GitHub workflow), or one line naming the variables it reads."""
    from fluxbatch.selection import shard_from

    if args.shard != "auto":
        shard: tuple[int, int] | None = args.shard
        return shard
    try:
        return shard_from(os.environ)
    except ConfigError as error:
        raise UsageError(f"--shard {error}") from None


def _emulator_keys(text: str) -> tuple[tuple[str, int | None], ...]:
    """`--keys alpha:24,beta:12,gamma`: each key, and its cap if given."""
    keys = []
    for item in text.split(","):
        key, colon, cap = item.strip().partition(":")
        if not key:
            raise argparse.ArgumentTypeError("each account needs a key: KEY[:CAP],...")
        keys.append((key, _positive_int(cap) if colon else None))
    return tuple(keys)


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


# What the help (and every message) means by these three words, one meaning each.
WORDS = """\
words:
  image  one picture the plan makes, at one output path (what plans count)
  job    a group of images in the recipe's `jobs:` list: a prompt over a matrix
  task   a request in flight at the provider (what `render -j/--jobs` caps)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxbatch",
        description="Declarative, make-style batch renderer for the Flux image APIs.",
        epilog=WORDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fluxbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check recipes and report every problem")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--yes", action="store_true",
                   help="accept plans of more images than the recipe's max_jobs")

    p = sub.add_parser("plan", help="show what would be rendered, why, and what it costs")
    _recipe_arguments(p)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_const", dest="form", const="json",
                      default="table", help="print the plan as one JSON object")
    form.add_argument("--jsonl", action="store_const", dest="form", const="jsonl",
                      help="print one JSON object per image, then a summary line, as the "
                      "images are planned")
    form.add_argument("--format", dest="form", metavar="FORMAT",
                      choices=("table", "json", "jsonl", "markdown"),
                      help="table (the default), json or jsonl (as --json, --jsonl), or, with "
                      "--diff, markdown: a comment for a pull request")
    p.add_argument("--diff", metavar="REF",
                   help="compare with the recipe (and the files it reads) at this git ref: "
                   "the images added, removed and changed, and what rendering the change "
                   "costs; no key is needed")
    p.add_argument("--explain", action="store_true",
                   help="say which matrix rule produced or removed each combination")
    _selection_arguments(p)
    p.add_argument("--emit", choices=("github", "kubernetes"),
                   help="print a ready job file instead: a GitHub Actions workflow or a "
                   "Kubernetes Indexed Job that renders the recipe in --shards N shards")
    p.add_argument("--shards", type=_positive_int, metavar="N",
                   help="with --emit: how many shards (machines) render it")
    p.add_argument("--accounts", metavar="FILE",
                   help="with --emit: every shard renders with this accounts file, its keys "
                   "from secrets of the names it gives")
    _store_argument(p, "count what it holds as obtainable for nothing; with --emit, every "
                    "shard renders with it and the last step pulls from it (FLUXBATCH_STORE in "
                    "the job file: only --store puts it there)")

    p = sub.add_parser("render", help="render every missing or stale image, and the manifest")
    _recipe_arguments(p, yes="accept a plan of more images than the recipe's max_jobs, and "
                      "render even when the estimated cost is over the account's balance")
    p.add_argument("-j", "--jobs", type=_positive_int, metavar="N",
                   help="at most N tasks in flight at the provider at once (default: its "
                   "cap, 24); the name is historical: these are tasks, not recipe jobs")
    p.add_argument("--base-url", metavar="URL",
                   help="send requests (and the API key) here instead of the provider's "
                   "default; also BFL_BASE_URL / COMETAPI_BASE_URL")
    p.add_argument("--dry-run", action="store_true",
                   help="show what would be submitted and what it would cost; send nothing")
    p.add_argument("--force", action="store_true", help="re-render every selected image")
    _selection_arguments(p)
    p.add_argument("--retry-unknown", action="store_true",
                   help="resubmit images whose earlier submit had no answer (may pay twice)")
    p.add_argument("--verify", action="store_true",
                   help="check every existing image and image input by its sha256, not "
                   "size and mtime")
    p.add_argument("--budget", type=_non_negative_float, metavar="USD",
                   help="spend at most this much: refuse to start when the estimate is "
                   "higher, and stop submitting when the next image would not fit (it counts "
                   "this run and the unfinished runs it continues)")
    p.add_argument("--timeout", type=_non_negative_float, metavar="SECONDS",
                   help="give up waiting for one task after this long (default 900)")
    p.add_argument("--accounts", metavar="FILE",
                   help="spread the render over the accounts this YAML file names, each "
                   "within its own cap, each key from its own variable (also "
                   "FLUXBATCH_ACCOUNTS; never in a recipe)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or lines")
    p.add_argument("--progress-every", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="without a terminal (CI), print a progress line this often "
                   "(default 5; 0: none)")
    p.add_argument("--json", action="store_true",
                   help="print the outcome as one JSON object on stdout")
    _store_argument(p, "claim each image there before paying for it, take what it holds, "
                    "and upload what this run buys")

    p = sub.add_parser("status", help="count images by state, offline; exit 0 when up to date")
    _recipe_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true",
                   help="check images and image inputs by sha256")
    p.add_argument("-v", "--verbose", action="store_true", help="list every image not up to date")
    _store_argument(p, "count what it holds as obtainable for nothing")

    p = sub.add_parser("pull", help="place the images a shared store holds for the recipe, "
                       "paying nothing")
    _recipe_arguments(p)
    _store_argument(p, "where the images come from")

    p = sub.add_parser("push", help="upload the images this output root holds for the recipe "
                       "to a shared store")
    _recipe_arguments(p)
    _store_argument(p, "where the images go")

    p = sub.add_parser("clean", help="list (or --delete) images whose job left the recipe")
    _recipe_arguments(p)
    p.add_argument("--delete", action="store_true", help="delete them and their entries")
    p.add_argument("--store", action="store_true",
                   help="also the content store's copies of images that placed files hold")

    p = sub.add_parser("merge", help="adopt the images other output roots hold for the recipe "
                       "(shards rendered elsewhere), without a request")
    _recipe_arguments(p)
    p.add_argument("sources", nargs="+", metavar="DIR", help="an output root to adopt from")

    p = sub.add_parser("credits", help="print the account's live balance at the provider")
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="use the recipe's provider and base URL")
    p.add_argument("--provider", help="bfl, cometapi or emulator (default: the recipe's, "
                   "else bfl)")
    p.add_argument("--base-url", metavar="URL",
                   help="the provider's base URL, as for render (also BFL_BASE_URL / "
                   "COMETAPI_BASE_URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("spend", help="what the ledger says was paid, offline")
    p.add_argument("root", nargs="?", default=".", metavar="ROOT",
                   help="an output root, or a recipe (its output root); default: here")
    p.add_argument("--by", choices=("recipe", "job", "model", "day", "run", "account"),
                   default="recipe",
                   help="group by (default: recipe)")
    p.add_argument("--since", metavar="DATE", help="only submits from this day on (UTC), "
                   "like 2026-05-01")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_const", dest="form", const="json",
                      default="table", help="print one JSON object (with total_usd)")
    form.add_argument("--csv", action="store_const", dest="form", const="csv",
                      help="print CSV, one row per group, then the total")

    p = sub.add_parser("inspect", help="print the provenance an image carries")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print it as JSON")

    p = sub.add_parser("reproduce", help="write a one-job recipe that makes an image again")
    p.add_argument("source", metavar="IMAGE_OR_MANIFEST")
    p.add_argument("--entry", metavar="PATH", help="with a manifest: the image's path")
    p.add_argument("-o", "--output", metavar="FILE", help="write the recipe here (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--verify", action="store_true",
                   help="render the image again (paid, after confirmation) into .verify/ in "
                   "its output root, and say whether the new one is identical, drifted (a "
                   "floating model) or differs; exit 1 when it differs")
    p.add_argument("--yes", action="store_true",
                   help="with --verify: pay without asking (needed without a terminal)")
    p.add_argument("--budget", type=_non_negative_float, metavar="USD",
                   help="with --verify: spend at most this much, as render --budget")
    p.add_argument("--base-url", metavar="URL",
                   help="with --verify: the provider's base URL, as for render")

    p = sub.add_parser("gallery", help="write an HTML contact sheet of the rendered images")
    _recipe_arguments(p)
    p.add_argument("--rows", metavar="VAR", help="matrix variable for the rows")
    p.add_argument("--cols", metavar="VAR", help="matrix variable for the columns")
    p.add_argument("--replicates", choices=("across", "down"), default="across",
                   help="a combination's replicates side by side (default) or stacked")
    p.add_argument("--thumb", type=int, default=200, metavar="PX",
                   help="thumbnail size, longer side, 64 to 1024 (default 200)")
    p.add_argument("--png", metavar="FILE",
                   help="also draw the contact sheet as one PNG image, for a pull request "
                   "or a chat message")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write it (default: NAME.gallery.html in the output root)")
    p.add_argument("--diff", metavar="REF",
                   help="only the images that differ from the recipe at this git ref, before "
                   "and after (default output: NAME.gallery-diff.html)")

    p = sub.add_parser("models", help="list known models, their parameters and prices")
    p.add_argument("model", nargs="?", help="show one model's parameters")
    p.add_argument("--add", metavar="OPENAPI", help="add the models of a provider's OpenAPI "
                   "document (https://api.bfl.ai/openapi.json) that this release does not "
                   "know to the project's own catalogue, fluxbatch.models.json")
    p.add_argument("--project", metavar="DIR", help="with --add: the project (default: the "
                   "git work tree or folder around the current one)")

    p = sub.add_parser("schema", help="print the recipe JSON Schema (or the manifest's)")
    p.add_argument("--manifest", action="store_true", help="the manifest's schema instead")

    p = sub.add_parser("emulator", help="run the bundled BFL-compatible emulator on loopback")
    p.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    p.add_argument("--latency", type=_non_negative_float, default=2.0,
                   help="mean seconds a task takes (default 2.0)")
    p.add_argument("--latency-sigma", type=_non_negative_float, default=0.25,
                   help="spread of the lognormal latency (default 0.25)")
    p.add_argument("--cap", type=_positive_int, default=24, help="active tasks (default 24)")
    p.add_argument("--kontext-max-cap", type=_positive_int, default=6,
                   help="active flux-kontext-max tasks (default 6)")
    p.add_argument("--fault-rate", type=_probability, default=0.0,
                   help="probability of an injected fault per request (default 0)")
    p.add_argument("--shed-rate", type=_probability, default=0.0,
                   help="probability that a submit below the caps is answered 429 anyway, as "
                        "a gateway shedding load does (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for latency, faults and shedding")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key", default=None, help="the only API key accepted (default: any)")
    keys.add_argument("--keys", type=_emulator_keys, metavar="KEY[:CAP],...",
                      help="several accounts, each its own key, with its own cap (default "
                      "--cap), credits (--credits) and tasks, which no other key is shown")
    p.add_argument("--url-ttl", type=_non_negative_float, default=600.0,
                   help="seconds a sample URL stays valid (default 600)")
    p.add_argument("--task-ttl", type=_non_negative_float, default=3600.0,
                   help="seconds a finished task can be polled (default 3600)")
    p.add_argument("--max-side", type=_positive_int, default=512,
                   help="largest image side served; larger requests are scaled (default 512)")
    p.add_argument("--log", default=None, help="append one JSON line per submitted task")
    p.add_argument("--credits", type=_non_negative_float, default=1_000_000.0,
                   help="the account's starting balance, in credits of $0.01 (default "
                   "1,000,000); a submit that costs more is answered 402")
    p.add_argument("--cost", type=_non_negative_float, metavar="CREDITS",
                   help="what each image costs, in credits (default: the catalogue's price); "
                   "moderated and failed tasks are refunded")
    p.add_argument("--no-cost-report", action="store_true",
                   help="answer submits with `cost: null`, as a provider that reports no cost")
    return parser


def _recipe_arguments(p: argparse.ArgumentParser, *,
                      yes: str = "accept a plan of more images than the recipe's max_jobs"
                      ) -> None:
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--out", metavar="DIR", help="output root (default: the recipe's directory)")
    p.add_argument("--yes", action="store_true", help=yes)


def _store_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--store", metavar="URL",
                   help=f"a shared store (s3://, gs://, az://, file://; also FLUXBATCH_STORE): "
                   f"{what}")


def _selection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="only the images of the job named PATTERN, those whose output path "
                   "or file name matches the glob, or NAME=VALUE on matrix values; repeated, "
                   "what any of them matches")
    p.add_argument("--shard", type=_shard, metavar="I/N|auto",
                   help="only shard I of N (a stable split of the images by key); auto: from "
                   "FLUXBATCH_SHARD=I/N, or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX "
                   "with FLUXBATCH_SHARDS=N")


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "validate": _validate,
        "plan": _plan,
        "render": _render,
        "status": _status,
        "clean": _clean,
        "merge": _merge,
        "credits": _credits,
        "spend": _spend,
        "pull": _pull,
        "push": _push,
        "inspect": _inspect,
        "reproduce": _reproduce,
        "gallery": _gallery,
        "models": _models,
        "schema": _schema,
        "emulator": _emulator,
    }
    return handlers[command](args)


def _validate(args: argparse.Namespace) -> int:
    from fluxbatch.commands.validate import validate

    return validate(recipes=args.recipes, yes=args.yes)


def _plan(args: argparse.Namespace) -> int:
    if args.emit or args.shards:
        return _emit(args)
    if args.accounts:
        raise UsageError("plan: --accounts goes with --emit")
    if args.diff is not None:
        from fluxbatch.commands.diff import check_form, plan_diff

        check_form(args.form, explain=args.explain)
        return plan_diff(recipe=args.recipe, out=args.out, yes=args.yes, ref=args.diff,
                         form=args.form, only=args.only, shard=_shard_of(args))
    if args.form == "markdown":
        raise UsageError("plan --format markdown: a comment is of a change; add --diff REF")
    from fluxbatch.commands.plan import plan

    return plan(recipe=args.recipe, out=args.out, yes=args.yes, form=args.form,
                explain=args.explain, only=args.only, shard=_shard_of(args), store=args.store)


def _emit(args: argparse.Namespace) -> int:
    from fluxbatch.commands.plan import emit_jobs

    if not (args.emit and args.shards):
        raise UsageError("plan: --emit github|kubernetes and --shards N go together")
    if args.only or args.shard or args.form != "table" or args.explain or args.diff:
        raise UsageError("plan --emit: the job file renders every image; --only, --shard, "
                         "--json, --jsonl, --format, --diff and --explain do not go with it")
    return emit_jobs(recipe=args.recipe, out=args.out, yes=args.yes, engine=args.emit,
                     shards=args.shards, accounts_file=args.accounts, store=args.store)


def _render(args: argparse.Namespace) -> int:
    from fluxbatch.commands.render import render
    from fluxbatch.session import Options

    options = Options(concurrency=args.jobs, base_url=args.base_url, force=args.force,
                      only=tuple(args.only), retry_unknown=args.retry_unknown,
                      verify=args.verify, budget=args.budget, shard=_shard_of(args),
                      task_timeout=args.timeout, yes=args.yes, store=args.store,
                      accounts=args.accounts)
    return render(recipe=args.recipe, out=args.out, yes=args.yes, options=options,
                  dry_run=args.dry_run, quiet=args.quiet, as_json=args.json,
                  progress_every=args.progress_every)


def _status(args: argparse.Namespace) -> int:
    from fluxbatch.commands.status import status

    return status(recipe=args.recipe, out=args.out, yes=args.yes, as_json=args.json,
                  verify=args.verify, verbose=args.verbose, store=args.store)


def _clean(args: argparse.Namespace) -> int:
    from fluxbatch.commands.clean import clean

    return clean(recipe=args.recipe, out=args.out, yes=args.yes, delete=args.delete,
                 store=args.store)


def _merge(args: argparse.Namespace) -> int:
    from fluxbatch.commands.merge import merge

    return merge(recipe=args.recipe, out=args.out, yes=args.yes, sources=args.sources)


def _credits(args: argparse.Namespace) -> int:
    from fluxbatch.commands.credits import credits

    return credits(recipe=args.recipe, provider=args.provider, base_url=args.base_url,
                   as_json=args.json)


def _spend(args: argparse.Namespace) -> int:
    from fluxbatch.commands.spend import spend

    return spend(root=args.root, by=args.by, since=args.since, form=args.form)


def _pull(args: argparse.Namespace) -> int:
    from fluxbatch.commands.shared import pull

    return pull(recipe=args.recipe, out=args.out, yes=args.yes, store=args.store)


def _push(args: argparse.Namespace) -> int:
    from fluxbatch.commands.shared import push

    return push(recipe=args.recipe, out=args.out, yes=args.yes, store=args.store)


def _inspect(args: argparse.Namespace) -> int:
    from fluxbatch.commands.inspect import inspect

    return inspect(image=args.image, as_json=args.json)


def _reproduce(args: argparse.Namespace) -> int:
    if args.verify:
        from fluxbatch.commands.verify import verify

        if args.output:
            raise UsageError("reproduce --verify writes no recipe: drop -o/--output")
        return verify(source=args.source, entry_path=args.entry, yes=args.yes,
                      budget=args.budget, base_url=args.base_url)
    if args.yes or args.budget is not None or args.base_url:
        raise UsageError("reproduce: --yes, --budget and --base-url go with --verify")
    from fluxbatch.commands.inspect import reproduce

    return reproduce(source=args.source, entry_path=args.entry, output=args.output,
                     force=args.force)


def _gallery(args: argparse.Namespace) -> int:
    from fluxbatch.commands.gallery import gallery

    if args.diff is not None:
        from fluxbatch.commands.gallery import gallery_diff

        if args.rows or args.cols:
            raise UsageError("gallery --diff: the sheet has a row per image that differs, "
                             "before and after; --rows and --cols do not apply")
        return gallery_diff(recipe=args.recipe, out=args.out, yes=args.yes, ref=args.diff,
                            output=args.output, png=args.png, thumb=args.thumb)
    return gallery(recipe=args.recipe, out=args.out, yes=args.yes, rows=args.rows,
                   cols=args.cols, output=args.output, png=args.png,
                   replicates=args.replicates, thumb=args.thumb)


def _models(args: argparse.Namespace) -> int:
    from fluxbatch.commands.models import models

    if args.add is not None:
        from fluxbatch.commands.models import add_models

        return add_models(spec=args.add, project=args.project)
    if args.project is not None:
        raise UsageError("models: --project goes with --add")
    return models(model=args.model)


def _schema(args: argparse.Namespace) -> int:
    from fluxbatch.commands.models import schema

    return schema(manifest=args.manifest)


def _emulator(args: argparse.Namespace) -> int:
    from fluxbatch.commands.emulator import emulator

    return emulator(host=args.host, port=args.port, latency=args.latency,
                    latency_sigma=args.latency_sigma, cap=args.cap,
                    kontext_max_cap=args.kontext_max_cap, fault_rate=args.fault_rate,
                    seed=args.seed, key=args.key, keys=args.keys or (), url_ttl=args.url_ttl,
                    task_ttl=args.task_ttl,
                    log=args.log, max_side=args.max_side, shed_rate=args.shed_rate,
                    credits=args.credits, cost=args.cost, report_cost=not args.no_cost_report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return _dispatch(args)
    except FluxbatchError as error:
        print(str(error) if isinstance(error, RecipeError) else f"fluxbatch: {error}",
              file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("fluxbatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except Exception:  # the last line of defence: never a raw traceback for the user
        return _report_bug()


def _report_bug() -> int:
    import tempfile
    import traceback

    # (a URL with a key in its query, CometAPI's balance query, is never written down)
    details = without_key_parameters(traceback.format_exc())
    kind, value, _ = sys.exc_info()
    summary = without_key_parameters(
        "".join(traceback.format_exception_only(kind, value)).strip().splitlines()[-1])
    fd, log_path = tempfile.mkstemp(prefix="fluxbatch-crash-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as log:
        log.write(f"fluxbatch {__version__}\n{details}")
    print(f"fluxbatch: internal error: {summary}\nThe full traceback is in {log_path}; please "
          "report it.", file=sys.stderr)
    return EXIT_BUG


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())

