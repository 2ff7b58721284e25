"""Fanning out on the engines teams already run: `--shard auto` from the environment of a
Kubernetes Indexed Job or the emitted GitHub workflow, and `plan --shards N --emit` writing
their job files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fluxbatch import yamlsource
from fluxbatch.main import main
from fluxbatch.version import __version__
from tests.helpers import build_file_tree

Capsys = pytest.CaptureFixture[str]
SHARD_VARIABLES = ("FLUXBATCH_SHARD", "JOB_COMPLETION_INDEX", "FLUXBATCH_SHARDS")


def recipe(values: int) -> str:
    items = ", ".join(f"v{n:03d}" for n in range(values))
    return f"""
        version: 1
        name: fan
        output: "{{{{ item }}}}.{{{{ ext }}}}"
        defaults: {{model: flux-dev, width: 256, height: 256}}
        jobs:
          - name: batch
            prompt: "object {{{{ item }}}}"
            matrix:
              item: [{items}]
        """


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in SHARD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    build_file_tree(tmp_path, {"recipe.yaml": recipe(60),
                               "accounts.yaml": "accounts:\n"
                               "  - {name: a, provider: bfl, key_env: BFL_KEY_A}\n"
                               "  - {name: b, provider: bfl, key_env: BFL_KEY_B, cap: 12}\n"})
    return tmp_path


def outputs(capsys: Capsys, *argv: str) -> set[str]:
    capsys.readouterr()
    assert main(["plan", "recipe.yaml", "--json", *argv]) == 0
    return {job["output"] for job in json.loads(capsys.readouterr().out)["jobs"]}


# -- --shard auto ------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3, 4])
def test_shard_auto_under_each_engine_gives_disjoint_shards_that_cover_the_plan(
        project: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    every = outputs(capsys)
    by_engine: dict[str, list[set[str]]] = {"github": [], "kubernetes": []}
    for index in range(shards):
        # the emitted workflow: FLUXBATCH_SHARD=I/N (1-based), from job-index and job-total
        monkeypatch.setenv("FLUXBATCH_SHARD", f"{index + 1}/{shards}")
        by_engine["github"].append(outputs(capsys, "--shard", "auto"))
        monkeypatch.delenv("FLUXBATCH_SHARD")
        # a Kubernetes Indexed Job: its 0-based index, and the count we set
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        monkeypatch.setenv("FLUXBATCH_SHARDS", str(shards))
        by_engine["kubernetes"].append(outputs(capsys, "--shard", "auto"))
        monkeypatch.delenv("JOB_COMPLETION_INDEX")
        monkeypatch.delenv("FLUXBATCH_SHARDS")
    assert by_engine["github"] == by_engine["kubernetes"]
    parts = by_engine["github"]
    assert set().union(*parts) == every
    assert sum(len(part) for part in parts) == len(every)  # disjoint
    assert parts == [outputs(capsys, "--shard", f"{i + 1}/{shards}") for i in range(shards)]


def test_adding_a_value_moves_no_image_to_another_shard(project: Path, capsys: Capsys) -> None:
    before = [outputs(capsys, "--shard", f"{i}/4") for i in range(1, 5)]
    build_file_tree(project, {"recipe.yaml": recipe(61)})

    after = [outputs(capsys, "--shard", f"{i}/4") for i in range(1, 5)]

    assert [part_after & set().union(*before) for part_after in after] == before


@pytest.mark.parametrize(("environment", "message"), [
    ({}, "no shard in the environment: set FLUXBATCH_SHARD=I/N, or JOB_COMPLETION_INDEX (a "
         "Kubernetes Indexed Job sets it) with FLUXBATCH_SHARDS=N"),
    ({"JOB_COMPLETION_INDEX": "2"}, "JOB_COMPLETION_INDEX is set (2), but not FLUXBATCH_SHARDS: "
                                    "set it to the Job's completions (Kubernetes does not say it)"),
    ({"JOB_COMPLETION_INDEX": "4", "FLUXBATCH_SHARDS": "4"},
     "JOB_COMPLETION_INDEX='4' with FLUXBATCH_SHARDS='4': the index must be from 0 to "
     "FLUXBATCH_SHARDS - 1"),
    ({"FLUXBATCH_SHARD": "0/3"}, "FLUXBATCH_SHARD='0/3': I must be between 1 and N"),
    ({"FLUXBATCH_SHARD": "two"}, "FLUXBATCH_SHARD='two': expected I/N, like 2/4, or auto"),
])
@pytest.mark.parametrize("command", ["plan", "render"])
def test_shard_auto_without_a_usable_shard_is_one_line_naming_the_variables(
        project: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch, command: str,
        environment: dict[str, str], message: str) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    code = main([command, "recipe.yaml", "--shard", "auto"])

    assert (code, capsys.readouterr().err) == (2, f"fluxbatch: --shard auto: {message}\n")


# -- plan --shards N --emit ---------------------------------------------------------------------


def emitted(capsys: Capsys, *argv: str) -> tuple[str, Any]:
    capsys.readouterr()
    assert main(["plan", "recipe.yaml", *argv]) == 0
    text = capsys.readouterr().out
    document, _ = yamlsource.load(text, "emitted.yaml")  # (YAML 1.2: `on` is no boolean)
    return text, document


def test_the_github_workflow_renders_each_shard_from_job_index_and_merges_them(
        project: Path, capsys: Capsys) -> None:
    text, workflow = emitted(capsys, "--shards", "4", "--emit", "github")

    assert text.startswith("# Written by `fluxbatch plan recipe.yaml --shards 4 --emit "
                           "github` (fluxbatch ")
    assert workflow["on"] == {"workflow_dispatch": {}}
    assert workflow["concurrency"] == {"group": "fluxbatch-fan", "cancel-in-progress": False}
    render = workflow["jobs"]["render"]
    assert render["strategy"] == {"fail-fast": False, "max-parallel": 4,
                                  "matrix": {"shard": [1, 2, 3, 4]}}
    step = next(step for step in render["steps"] if "fluxbatch render" in step.get("run", ""))
    assert step["env"] == {"BFL_API_KEY": "${{ secrets.BFL_API_KEY }}",
                           "JOB_INDEX": "${{ strategy.job-index }}",
                           "JOB_TOTAL": "${{ strategy.job-total }}"}
    assert step["run"] == ('export FLUXBATCH_SHARD="$((JOB_INDEX + 1))/$JOB_TOTAL"\n'
                           "fluxbatch render recipe.yaml --shard auto --out out\n")
    upload = render["steps"][-1]
    assert (upload["uses"], upload["with"]["path"], upload["with"]["include-hidden-files"]) == (
        "actions/upload-artifact@v4", "out/", True)
    final = workflow["jobs"]["manifest"]
    assert final["needs"] == "render"
    runs = [step.get("run", "") for step in final["steps"]]
    assert "fluxbatch merge recipe.yaml --out out shards/shard-*\n" in runs
    uploads = {step["with"]["name"]: step["with"]["path"] for step in final["steps"]
               if step.get("uses") == "actions/upload-artifact@v4"}
    assert uploads == {"fan-manifest": "out/fan.manifest.json", "fan-renders": "out/"}
    assert "&id" not in text and "*id" not in text  # no YAML anchors


def test_the_github_workflow_with_accounts_and_a_store(project: Path, capsys: Capsys) -> None:
    _, workflow = emitted(capsys, "--shards", "2", "--emit", "github", "--accounts",
                          "accounts.yaml", "--store", "s3://team-renders/fan")

    step = workflow["jobs"]["render"]["steps"][3]
    assert step["env"] == {"BFL_KEY_A": "${{ secrets.BFL_KEY_A }}",
                           "BFL_KEY_B": "${{ secrets.BFL_KEY_B }}",
                           "FLUXBATCH_STORE": "s3://team-renders/fan",
                           "JOB_INDEX": "${{ strategy.job-index }}",
                           "JOB_TOTAL": "${{ strategy.job-total }}"}
    assert step["run"].endswith("fluxbatch render recipe.yaml --shard auto --out out "
                                "--accounts accounts.yaml\n")
    final = [step.get("run") for step in workflow["jobs"]["manifest"]["steps"]]
    assert "fluxbatch pull recipe.yaml --out out\n" in final
    assert not any("merge" in (run or "") for run in final)
    # (both jobs install the extra that reads and writes s3://)
    for job in ("render", "manifest"):
        assert f"pip install 'fluxbatch[s3]=={__version__}'" in [
            step.get("run") for step in workflow["jobs"][job]["steps"]]


def test_the_kubernetes_job_is_indexed_one_pod_per_index_with_its_key_from_a_secret(
        project: Path, capsys: Capsys) -> None:
    text, job = emitted(capsys, "--shards", "5", "--emit", "kubernetes")

    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == (
        "batch/v1", "Job", "fluxbatch-fan")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"],
            spec["podReplacementPolicy"]) == ("Indexed", 5, 5, "Failed")
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["command"] == [
        "sh", "-c", 'fluxbatch render recipe.yaml --shard auto --out '
                    '"/renders/shard-${JOB_COMPLETION_INDEX}"']
    assert container["env"] == [
        {"name": "FLUXBATCH_SHARDS", "value": "5"},
        {"name": "BFL_API_KEY",
         "valueFrom": {"secretKeyRef": {"name": "fluxbatch-keys", "key": "BFL_API_KEY"}}}]
    assert container["volumeMounts"] == [{"name": "renders", "mountPath": "/renders"}]
    assert pod["volumes"] == [{"name": "renders",
                               "persistentVolumeClaim": {"claimName": "fluxbatch-renders"}}]
    assert "fluxbatch merge recipe.yaml --out /renders/all /renders/shard-*" in text


def test_the_kubernetes_job_with_a_store_needs_no_volume_claim(project: Path,
                                                               capsys: Capsys) -> None:
    _, job = emitted(capsys, "--shards", "2", "--emit", "kubernetes", "--accounts",
                     "accounts.yaml", "--store", "gs://team/fan")

    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert [variable["name"] for variable in container["env"]] == [
        "FLUXBATCH_SHARDS", "BFL_KEY_A", "BFL_KEY_B", "FLUXBATCH_STORE"]
    assert container["env"][-1] == {"name": "FLUXBATCH_STORE", "value": "gs://team/fan"}
    assert container["command"][-1].endswith("--accounts accounts.yaml")
    assert pod["volumes"] == [{"name": "renders", "emptyDir": {}}]


@pytest.mark.parametrize(("argv", "message"), [
    (["--emit", "github"], "plan: --emit github|kubernetes and --shards N go together"),
    (["--shards", "3"], "plan: --emit github|kubernetes and --shards N go together"),
    (["--emit", "github", "--shards", "2", "--json"],
     "plan --emit: the job file renders every image; --only, --shard, --json, --jsonl, "
     "--format, --diff and --explain do not go with it"),
    (["--accounts", "accounts.yaml"], "plan: --accounts goes with --emit"),
])
def test_emit_options_that_do_not_go_together_are_one_line(
        project: Path, capsys: Capsys, argv: list[str], message: str) -> None:
    code = main(["plan", "recipe.yaml", *argv])

    assert (code, capsys.readouterr()) == (2, ("", f"fluxbatch: {message}\n"))
