"""`fluxbatch plan RECIPE --shards N --emit github|kubernetes`: a ready job file that renders
the recipe in N shards on the engine a team already runs.

- **github**: a workflow with an N-way matrix. Each job passes `strategy.job-index` and
  `job-total` (expression contexts, not environment variables) into `FLUXBATCH_SHARD` and runs
  `render --shard auto`, the key from a secret; a final job merges the shards' output roots
  (or, with a shared store, pulls from it) and uploads the manifest and the images.
- **kubernetes**: an Indexed Job (`completionMode: Indexed`, `completions` and `parallelism`
  N, `podReplacementPolicy: Failed`, so that two pods never hold one index), its pods running
  `render --shard auto` with `FLUXBATCH_SHARDS` set (Kubernetes gives each pod its 0-based
  `JOB_COMPLETION_INDEX`, not the count), the key from a Secret, and the output on a volume,
  one output root per index (or a shared store).

The shards split the images by key (`selection.in_shard`): adding a value to the recipe moves
no image to another shard. See docs/scale.md.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from fluxbatch import providers
from fluxbatch.accounts import Account
from fluxbatch.errors import UsageError
from fluxbatch.jobs import Plan
from fluxbatch.selection import SHARD_ENV, SHARDS_ENV
from fluxbatch.state.shared import EXTRAS
from fluxbatch.version import __version__

GITHUB, KUBERNETES = "github", "kubernetes"
ENGINES = (GITHUB, KUBERNETES)
STORE_ENV = "FLUXBATCH_STORE"  # a shared store's URL (`--store`), as `render` reads it
SECRET = "fluxbatch-keys"  # the Kubernetes Secret that holds the keys
VOLUME_CLAIM = "fluxbatch-renders"  # the Kubernetes volume claim that holds the output roots
IMAGE = "registry.example.com/your-team/fluxbatch-project:latest"  # (a placeholder)
PYTHON = "3.12"


@dataclass(frozen=True, slots=True)
class Emit:
    """What the job file is made of: where the recipe is (relative to the repository or the
    image's working directory), how many shards, the keys' variables, and the options that
    every shard renders with."""

    recipe: str  # as the job runs it: relative, with /
    name: str  # the recipe's name
    shards: int
    keys: tuple[str, ...]  # environment variables that hold the keys (from secrets)
    accounts: str | None = None  # the accounts file, relative
    store: str | None = None  # a shared store's URL (`--store`)


def emit(plan: Plan, *, engine: str, shards: int, recipe: str,
         pool: Sequence[Account] | None = None, accounts_file: str | None = None,
         store: str | None = None) -> str:
    """The job file, as text."""
    if shards < 1:
        raise UsageError(f"--shards {shards}: there must be at least one shard")
    info = providers.REGISTRY[plan.recipe.provider.name]
    if pool:
        keys = tuple(dict.fromkeys(variable for account in pool
                                   for variable in (account.key_env, account.key_file_env)
                                   if variable))
    else:
        keys = (info.key_env,) if info.key_env else ()
    spec = Emit(_relative(recipe), plan.recipe.name, shards, keys,
                _relative(accounts_file) if accounts_file else None, store)
    document = github(spec) if engine == GITHUB else kubernetes(spec)
    return _header(spec, engine) + _dump(document)


def _relative(path: str) -> str:
    """A path as a job runs it: relative to the working directory, with /."""
    relative = os.path.relpath(path) if os.path.isabs(path) else os.path.normpath(path)
    return relative.replace(os.sep, "/")


def _package(store: str | None) -> str:
    """What pip installs: this version of fluxbatch, with the extra that the shared store's
    backend needs (`fluxbatch[s3]` for s3://; a file:// store needs none)."""
    extra = EXTRAS.get(store.partition("://")[0].lower()) if store else None
    return f"fluxbatch[{extra}]=={__version__}" if extra else f"fluxbatch=={__version__}"


def _render_command(spec: Emit, out: str) -> str:
    """The shell line each shard runs (`out` is left as written: it may name a variable)."""
    command = f"fluxbatch render {shlex.quote(spec.recipe)} --shard auto --out {out}"
    if spec.accounts:
        command += f" --accounts {shlex.quote(spec.accounts)}"
    return command


# -- GitHub Actions ---------------------------------------------------------------------------


def github(spec: Emit) -> dict[str, object]:
    install = {"name": "install fluxbatch", "run": f"pip install '{_package(spec.store)}'"}
    setup = [{"uses": "actions/checkout@v4"},
             {"uses": "actions/setup-python@v5", "with": {"python-version": PYTHON}},
             install]
    env: dict[str, str] = {key: f"${{{{ secrets.{key} }}}}" for key in spec.keys}
    if spec.store:
        env[STORE_ENV] = spec.store
    env["JOB_INDEX"] = "${{ strategy.job-index }}"
    env["JOB_TOTAL"] = "${{ strategy.job-total }}"
    render = {
        "name": f"render shard ${{{{ matrix.shard }}}} of {spec.shards}",
        "env": env,
        # (GitHub's expressions cannot add: the shell makes the 0-based index 1-based)
        "run": f'export {SHARD_ENV}="$((JOB_INDEX + 1))/$JOB_TOTAL"\n'
               f"{_render_command(spec, 'out')}\n",
    }
    upload = {"name": "keep the shard's output root, its state included",
              "if": "${{ !cancelled() }}", "uses": "actions/upload-artifact@v4",
              "with": {"name": "shard-${{ matrix.shard }}", "path": "out/",
                       "include-hidden-files": True, "retention-days": 7}}
    if spec.store:
        gather = {"name": "pull the images from the shared store",
                  "env": {STORE_ENV: spec.store},
                  "run": f"fluxbatch pull {spec.recipe} --out out\n"}
        collect_steps = [gather]
    else:
        download = {"name": "download the shards' output roots",
                    "uses": "actions/download-artifact@v4",
                    "with": {"pattern": "shard-*", "path": "shards"}}
        gather = {"name": "merge the shards",
                  "run": f"fluxbatch merge {spec.recipe} --out out shards/shard-*\n"}
        collect_steps = [download, gather]
    manifest = {
        "needs": "render",
        "if": "${{ !cancelled() }}",
        "runs-on": "ubuntu-latest",
        "steps": [*setup, *collect_steps,
                  {"name": "upload the manifest", "uses": "actions/upload-artifact@v4",
                   "with": {"name": f"{spec.name}-manifest",
                            "path": f"out/{spec.name}.manifest.json"}},
                  {"name": "upload the images", "uses": "actions/upload-artifact@v4",
                   "with": {"name": f"{spec.name}-renders", "path": "out/"}}],
    }
    return {
        "name": f"fluxbatch {spec.name}",
        "on": {"workflow_dispatch": {}},
        "permissions": {"contents": "read"},
        # (two runs of one recipe at once would each pay for the same images)
        "concurrency": {"group": f"fluxbatch-{spec.name}", "cancel-in-progress": False},
        "jobs": {
            "render": {
                "runs-on": "ubuntu-latest",
                "timeout-minutes": 360,
                "strategy": {"fail-fast": False, "max-parallel": spec.shards,
                             "matrix": {"shard": list(range(1, spec.shards + 1))}},
                "steps": [*setup, render, upload],
            },
            "manifest": manifest,
        },
    }


# -- Kubernetes -------------------------------------------------------------------------------


def kubernetes(spec: Emit) -> dict[str, object]:
    name = _dns_label(f"fluxbatch-{spec.name}")
    labels = {"app.kubernetes.io/name": "fluxbatch", "fluxbatch/recipe": _dns_label(spec.name)}
    env: list[dict[str, object]] = [{"name": SHARDS_ENV, "value": str(spec.shards)}]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}
            for key in spec.keys]
    if spec.store:
        env.append({"name": STORE_ENV, "value": spec.store})
        volume: dict[str, object] = {"name": "renders", "emptyDir": {}}
    else:
        volume = {"name": "renders", "persistentVolumeClaim": {"claimName": VOLUME_CLAIM}}
    # Each index renders into an output root of its own (two renders of one root wait for
    # each other's lock); `fluxbatch merge` gathers them afterwards.
    out = '"/renders/shard-${JOB_COMPLETION_INDEX}"'  # (the shell reads it: 0, 1, ...)
    container = {
        "name": "render",
        "image": IMAGE,
        "workingDir": "/project",
        "command": ["sh", "-c", _render_command(spec, out)],
        "env": env,
        "volumeMounts": [{"name": "renders", "mountPath": "/renders"}],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                      "limits": {"memory": "2Gi"}},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.shards,
            "parallelism": spec.shards,
            # a replacement pod starts only once the failed one is gone: never two at once
            # on one index (one output root, one shard)
            "podReplacementPolicy": "Failed",
            "backoffLimitPerIndex": 3,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "containers": [container],
                         "volumes": [volume]},
            },
        },
    }


def _dns_label(text: str) -> str:
    """A Kubernetes name: lower case letters, digits and -, at most 63."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:63].rstrip("-") or "fluxbatch"


# -- text -------------------------------------------------------------------------------------


def _header(spec: Emit, engine: str) -> str:
    command = f"fluxbatch plan {spec.recipe} --shards {spec.shards} --emit {engine}"
    if spec.accounts:
        command += f" --accounts {spec.accounts}"
    if spec.store:
        command += f" --store {spec.store}"
    lines = [f"Written by `{command}` (fluxbatch {__version__}).",
             f"Renders the recipe {spec.name!r} in {spec.shards} shards, split by each image's "
             "key: see docs/scale.md."]
    if engine == GITHUB:
        lines.append("Save it as .github/workflows/fluxbatch-" + _dns_label(spec.name) +
                     ".yml; run it from the Actions tab.")
        if spec.keys:
            lines.append("Repository secrets it reads: " + ", ".join(spec.keys) + ".")
        if spec.store:
            lines.append("Give the render and manifest jobs the shared store's own "
                         "credentials (see docs/store.md): this file does not name them.")
    else:
        lines += ["Build an image with fluxbatch and this project in /project, and put its "
                  "name in `image:`.",
                  f"The keys come from the Secret {SECRET!r}: kubectl create secret generic "
                  f"{SECRET} " + " ".join(f"--from-literal={key}=..." for key in spec.keys),
                  ]
        if spec.store:
            lines.append("Each index pushes what it renders to the shared store; gather "
                         f"them with: fluxbatch pull {spec.recipe} --store {spec.store}")
        else:
            lines.append(f"The output roots are on the volume claim {VOLUME_CLAIM!r} "
                         "(ReadWriteMany), one per index; gather them afterwards with: "
                         f"fluxbatch merge {spec.recipe} --out /renders/all "
                         "/renders/shard-*")
    return "".join(f"# {line}\n" for line in lines)


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks (a `run:` script reads as written),
    and no anchors: a step used twice is written twice (not every engine reads `&id001`)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def _dump(document: dict[str, object]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=100, allow_unicode=True)
