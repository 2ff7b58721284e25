"""`fluxbatch render` end to end: the CLI against the bundled emulator on loopback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fluxbatch import imagemeta
from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.main import main
from tests.helpers import build_file_tree

SECRET = "sk-test-SECRET"
MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff"}
MANIFEST_FIELDS = {"path", "key", "job", "vars", "replicate", "prompt", "model", "request",
                   "seed", "reported_seed", "provider", "task_id", "cost", "submitted_at",
                   "finished_at", "sha256", "bytes", "status"}
MISSING_KEY = ("fluxbatch: provider 'bfl' needs an API key: set BFL_API_KEY (or "
               "BFL_API_KEY_FILE to a file holding it); the key is never read from the recipe\n")


@contextmanager
def serve(**overrides: Any) -> Iterator[Emulator]:
    with EmulatorThread(EmulatorConfig(**{"latency": 0.0, **overrides})) as emulator:
        yield emulator


def write_recipe(root: Path, *, provider: str = "emulator",
                 subjects: tuple[str, ...] = ("teapot", "kettle")) -> Path:
    build_file_tree(root, {"recipe.yaml": f"""
        version: 1
        name: e2e
        provider: {provider}
        output: "{{{{ job }}}}/{{{{ subject | slug }}}}.{{{{ ext }}}}"
        defaults:
          model: flux-pro-1.1
          width: 256
          height: 256
        jobs:
          - name: pngs
            prompt: "a {{{{ subject }}}}"
            params: {{output_format: png}}
            matrix:
              subject: {json.dumps(list(subjects))}
          - name: jpegs
            prompt: "a {{{{ subject }}}} at night"
            params: {{output_format: jpeg}}
            matrix:
              subject: [mug]
        """})
    return root / "recipe.yaml"


def render(recipe: Path, emulator: Emulator, *options: str) -> int:
    return main(["render", str(recipe), "--base-url", emulator.base_url, "-q", *options])


def manifest_images(root: Path) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = json.loads((root / "e2e.manifest.json").read_text())["images"]
    return images


def test_render_writes_images_and_manifest_then_rerun_sends_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        first = capsys.readouterr()
        sent = (emulator.stats.submits, emulator.stats.polls, emulator.stats.downloads)
        task_ids = {s["task_id"] for s in emulator.submissions}

        assert render(recipe, emulator) == 0
        second = capsys.readouterr()
        assert (emulator.stats.submits, emulator.stats.polls, emulator.stats.downloads) == sent
        assert emulator.stats.leaked_auth_downloads == 0

    manifest = tmp_path / "e2e.manifest.json"
    assert first.out == f"3 written; cost $0.12 (reported by the provider); manifest {manifest}\n"
    assert first.err == ""
    assert second.out == "nothing to render: 3 images up to date\n"
    assert sent[0] == 3 and sent[2] == 3
    images = manifest_images(tmp_path)
    assert [image["path"] for image in images] == [
        "jpegs/mug.jpg", "pngs/kettle.png", "pngs/teapot.png"]
    for image in images:
        data = (tmp_path / image["path"]).read_bytes()
        assert data.startswith(MAGIC[Path(image["path"]).suffix])
        assert set(image) >= MANIFEST_FIELDS
        assert image["sha256"] == hashlib.sha256(data).hexdigest()
        assert image["bytes"] == len(data)
        embedded = {k: v for k, v in image.items() if k not in ("sha256", "bytes")}
        assert imagemeta.extract(data) == embedded
        assert image["task_id"] in task_ids
        assert (image["provider"], image["cost"], image["status"]) == ("emulator", 4.0, "written")
        assert image["seed"] == image["request"]["seed"] == image["reported_seed"]
        assert image["submitted_at"] <= image["finished_at"]
        assert image["finished_at"].endswith("+00:00")
    teapot = images[2]
    assert (teapot["job"], teapot["vars"], teapot["replicate"], teapot["prompt"],
            teapot["model"]) == ("pngs", {"subject": "teapot"}, 1, "a teapot", "flux-pro-1.1")
    assert teapot["request"] == {"prompt": "a teapot", "width": 256, "height": 256,
                                 "output_format": "png", "seed": teapot["seed"]}
    totals = json.loads(manifest.read_text())["totals"]
    [run] = totals.pop("runs")
    assert totals == {
        "images": 3, "bytes": sum(image["bytes"] for image in images), "cost_credits": 12.0}
    # What the run paid, from the ledger: as `fluxbatch spend --by run` says it.
    assert run == {"run": run["run"], "paid": 3, "estimate_usd": 0.12, "reported_usd": 0.12,
                   "not_reported": 0, "refunded": 0, "refunded_usd": 0.0, "unknown": 0,
                   "spent_usd": 0.12}


def test_api_key_never_leaks_into_files_output_or_downloads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFL_API_KEY", SECRET)
    recipe = write_recipe(tmp_path, provider="bfl")
    with serve(key=SECRET) as emulator:  # it refuses any other key
        assert render(recipe, emulator) == 0
        stats = emulator.stats

    captured = capsys.readouterr()
    assert (stats.submits, stats.downloads, stats.rejected_auth) == (3, 3, 0)
    assert stats.leaked_auth_downloads == 0
    assert SECRET not in captured.out + captured.err
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert tmp_path / ".fluxbatch" / "state.sqlite" in files
    assert len([path for path in files if path.suffix in MAGIC]) == 3
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert {image["provider"] for image in manifest_images(tmp_path)} == {"bfl"}


def test_missing_key_exits_1_naming_the_variable_before_any_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, provider="bfl")
    with serve() as emulator:
        assert render(recipe, emulator) == 1
        stats = emulator.stats

    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", MISSING_KEY)
    assert (stats.submits, stats.polls, stats.rejected_auth) == (0, 0, 0)
    assert not [path for path in tmp_path.rglob("*") if path.suffix in MAGIC]


def test_moderated_job_exits_1_with_a_summary_table_and_the_others_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, subjects=("teapot", "kettle [[request-moderated]]"))
    with serve() as emulator:
        assert render(recipe, emulator) == 1
        assert emulator.stats.submits == 3

    captured = capsys.readouterr()
    # (the moderated task is not billed)
    assert captured.out == ("2 written, 1 moderated; cost $0.080 (reported by the provider); "
                            f"manifest {tmp_path / 'e2e.manifest.json'}\n")
    assert captured.err.splitlines() == [
        "JOB   VALUES" + " " * 32 + "OUTPUT" + " " * 29 + "STATUS     REASON",
        "pngs  subject=kettle [[request-moderated]]  pngs/kettle-request-moderated.png  "
        "moderated  Request Moderated (Moderation Reasons: emulated request moderation)",
    ]
    assert (tmp_path / "pngs" / "teapot.png").read_bytes().startswith(MAGIC[".png"])
    assert (tmp_path / "jpegs" / "mug.jpg").read_bytes().startswith(MAGIC[".jpg"])
    assert not (tmp_path / "pngs" / "kettle-request-moderated.png").exists()
    assert [image["path"] for image in manifest_images(tmp_path)] == [
        "jpegs/mug.jpg", "pngs/teapot.png"]

    # status says what to do about it: not "render makes what is missing"
    assert main(["status", str(recipe)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1:] == [
        "STATE       IMAGES", "up-to-date       2", "moderated        1"]
    assert captured.err == ("1 moderated: change the prompt, or `fluxbatch render --force` to "
                            "try again as it is\n")


# -- local faults: a clear line and exit 1, never a traceback; paid work is kept -------------


def test_a_directory_at_an_output_path_leaves_the_image_in_flight_for_a_free_rerun(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path)
    (tmp_path / "pngs" / "teapot.png").mkdir(parents=True)
    with serve() as emulator:
        assert render(recipe, emulator) == 1
        out, err = capsys.readouterr()
        paid = len(emulator.submissions)
        (tmp_path / "pngs" / "teapot.png").rmdir()
        assert render(recipe, emulator) == 0
        assert len(emulator.submissions) == paid  # collected again, not paid again
    assert out == (f"2 written, 1 pending; cost $0.12 (reported by the provider); manifest "
                   f"{tmp_path / 'e2e.manifest.json'}\n")
    assert "internal error" not in err
    assert err.endswith("1 task still in flight: run again to collect them (they are not paid "
                        "for twice).\n")
    assert (tmp_path / "pngs" / "teapot.png").read_bytes().startswith(MAGIC[".png"])
    assert paid == 3


def test_a_paid_image_that_cannot_be_downloaded_is_collected_by_the_next_run_not_paid_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path)
    with serve(url_ttl=-60.0) as emulator:  # every sample URL has expired when it is fetched
        assert render(recipe, emulator) == 1
        out, err = capsys.readouterr()
        assert (len(emulator.submissions), emulator.stats.downloads) == (3, 0)
        assert render(recipe, emulator) == 1  # polled again for fresh URLs, not paid again
        assert len(emulator.submissions) == 3
        assert render(recipe, emulator, "--force") == 1  # the way to pay anew
        assert len(emulator.submissions) == 6
        emulator.reconfigure(url_ttl=600.0)  # the delivery works again
        assert render(recipe, emulator) == 0
        assert len(emulator.submissions) == 6  # collected, not paid again
    assert out == (f"3 pending; cost $0.12 (reported by the provider); manifest "
                   f"{tmp_path / 'e2e.manifest.json'}\n")
    assert "internal error" not in err
    lines = err.splitlines()
    assert lines[0].split() == ["JOB", "VALUES", "OUTPUT", "STATUS", "REASON"]
    assert len(lines) == 5 and all(  # each says why, and that it is not paid again
        " pending  download failed: HTTP 403: AuthenticationFailed: " in line and
        line.endswith("; the next run downloads it again without paying (or --force pays for "
                      "a new one)") for line in lines[1:4])
    assert lines[4] == ("3 tasks still in flight: run again to collect them (they are not "
                        "paid for twice).")
    assert len(manifest_images(tmp_path)) == 3


def test_a_manifest_that_cannot_be_written_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        (tmp_path / "pngs" / "teapot.png").unlink()
        (tmp_path / "e2e.manifest.json").unlink()
        (tmp_path / "e2e.manifest.json").mkdir()  # (as a full disk would, os.replace fails)
        capsys.readouterr()
        code = render(recipe, emulator)
    err = capsys.readouterr().err
    assert code == 1
    assert err == (f"fluxbatch: cannot write {tmp_path / 'e2e.manifest.json'}: Is a directory. "
                   "Every image written is recorded in the state store; free some space (or "
                   "make the folder writable) and run `fluxbatch render` again to write the "
                   "manifest. Nothing is paid twice.\n")
    assert len(list(tmp_path.rglob("*.png"))) == 2
    (tmp_path / "e2e.manifest.json").rmdir()
    assert main(["status", str(recipe)]) == 0  # the store had it all


def test_an_output_root_that_is_not_a_folder_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path)
    (tmp_path / "out").write_text("a file")
    with serve() as emulator:
        code = main(["render", str(recipe), "--out", str(tmp_path / "out"),
                     "--base-url", emulator.base_url, "-q"])
    assert (code, capsys.readouterr().err) == (
        1, f"fluxbatch: cannot use the output root {tmp_path / 'out'}: it is a file, not a "
        "folder\n")


def test_a_store_damaged_past_its_header_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        database = tmp_path / ".fluxbatch" / "state.sqlite"
        data = bytearray(database.read_bytes())
        data[4096:] = b"\xde\xad" * ((len(data) - 4096) // 2)  # every page past the first
        database.write_bytes(bytes(data))
        for suffix in ("-wal", "-shm"):
            (database.parent / f"state.sqlite{suffix}").unlink(missing_ok=True)
        capsys.readouterr()
        code = render(recipe, emulator)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"fluxbatch: {database}: the state store is unreadable (")
    assert err.endswith(f"No image is touched: move it away (for example `mv {database} "
                        f"{database}.broken`) and run again, and fluxbatch rebuilds it from "
                        f"the manifests in {tmp_path}/\n")


@pytest.mark.parametrize(("where", "errno_", "what"), [
    pytest.param("/blobs/", 28, "stopped: cannot keep a downloaded image: No space left on "
                 "device", id="disk full in the content store"),
    pytest.param("/pngs/", 28, "stopped: cannot write {root}/pngs/teapot.png: No space left on "
                 "device", id="disk full at an output"),
    pytest.param("/pngs/", 30, "stopped: cannot write {root}/pngs/teapot.png: Read-only file "
                 "system", id="read-only image folder"),
    pytest.param("/pngs/", 13, "stopped: cannot write {root}/pngs/teapot.png: Permission "
                 "denied", id="image folder of another user"),
    pytest.param("/pngs/", 18, "stopped: cannot write {root}/pngs/teapot.png: Invalid "
                 "cross-device link", id="no rename even beside the image"),
    pytest.param("/e2e.manifest.json", 28, "cannot write {root}/e2e.manifest.json: No space "
                 "left on device. Every image written is recorded in the state store; free some "
                 "space (or make the folder writable) and run `fluxbatch render` again to write "
                 "the manifest. Nothing is paid twice.", id="disk full at the manifest"),
])
def test_a_disk_that_refuses_writes_stops_the_run_with_one_line_and_nothing_is_paid_twice(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        where: str, errno_: int, what: str) -> None:
    """The file system is made to refuse (as a full or read-only disk does) every rename into
    `where`: the run stops submitting, says so in one line, and the next run collects."""
    import errno as errnos
    import os

    recipe = write_recipe(tmp_path, subjects=("teapot",))
    real_replace = os.replace

    def refusing(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if where in os.fspath(target):
            raise OSError(errno_, os.strerror(errno_))
        real_replace(source, target, *args, **kwargs)

    with serve() as emulator:
        monkeypatch.setattr(os, "replace", refusing)
        code = render(recipe, emulator)
        monkeypatch.setattr(os, "replace", real_replace)
        err = capsys.readouterr().err
        paid = len(emulator.submissions)
        assert render(recipe, emulator) == 0
        assert len(emulator.submissions) == paid  # collected, not paid again
    assert code == 1
    assert errno_ in (errnos.ENOSPC, errnos.EROFS, errnos.EACCES, errnos.EXDEV)
    assert "Traceback" not in err and "internal error" not in err
    assert f"fluxbatch: {what.format(root=tmp_path)}" in err.splitlines(), err
    assert sorted(p.name for p in tmp_path.rglob("*.png") if ".fluxbatch" not in p.parts) == [
        "teapot.png"]
