"""What an output root reads back is data anyone could have written: a committed manifest
(from a pull request), the ledger (a tampered or restored `.fluxbatch/`), the bytes kept in
the content store (damaged on disk). Nothing outside the output root is ever read, written or
deleted through a path read back, damage on disk is never blamed on the provider nor paid for
again, and an output folder on another file system is written like any other."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxbatch.emulator import Emulator
from fluxbatch.layout import STATE_DIR
from fluxbatch.main import main
from fluxbatch.outcomes import LocalFault
from fluxbatch.state.blobs import blob_path, keep_blob
from fluxbatch.write import atomic_write
from tests.helpers import Cli, Run, aligned, check_manifest, images

ALL = ["grid/circle.png", "grid/square.png", "grid/star.png", "solo/tree.png"]
RESTORE = ("Restore it (from version control), or delete it: fluxbatch then recognises your "
           "images by the provenance embedded in them. No image is touched.\n")


def png(side: int = 7) -> bytes:
    """A PNG that fluxbatch never made (a file of the user's, outside the output root)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def manifest_of(cli: Cli) -> tuple[Path, dict[str, Any]]:
    path = cli.root / "rebuild.manifest.json"
    document: dict[str, Any] = json.loads(path.read_text())
    return path, document


def entry(document: dict[str, Any], path: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in document["images"] if e["path"] == path)
    return found


def ledger(cli: Cli, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(cli.root / STATE_DIR / "state.sqlite") as db:
        return db.execute(sql, parameters).fetchall()


def key_of(cli: Cli, path: str) -> str:
    _, document = manifest_of(cli)
    return str(entry(document, path)["key"])


def collected(cli: Cli, count: int, up_to_date: int) -> str:
    """The report of a render that collected `count` tasks paid for by earlier runs."""
    return cli.written(count, up_to_date=up_to_date).replace(
        f"cost ${0.04 * count:.3f} (reported by the provider)",
        f"nothing paid, and ${0.04 * count:.3f} paid by earlier runs for the tasks collected")


# -- C2: a committed manifest names a file outside the output root -----------------------------


@pytest.fixture
def checkout(rendered: Cli) -> Cli:
    """A fresh checkout of a rendered project: its manifest, and no `.fluxbatch/`."""
    shutil.rmtree(rendered.root / STATE_DIR)
    return rendered


@pytest.mark.parametrize("outside", ["../victim.txt", "absolute"])
def test_render_deletes_nothing_a_committed_manifest_points_outside_the_root(
        checkout: Cli, emulator: Emulator, tmp_path: Path, outside: str) -> None:
    """The star's entry names a file outside the root as its path: render used to rewrite the
    star and then delete that "previous" file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    named = str(victim) if outside == "absolute" else outside
    manifest, document = manifest_of(checkout)
    entry(document, "grid/star.png")["path"] = named
    manifest.write_text(json.dumps(document))
    before, sent = images(checkout.root), len(emulator.submissions)
    why = (f"output path {named!r} is absolute; it must be relative to the output root"
           if outside == "absolute" else
           f"output path {named!r} leaves the output root ('..')")
    refused = Run(1, "", f"fluxbatch: {manifest}: the manifest is damaged: images[2] is "
                         f"refused: {why}. {RESTORE}")

    assert checkout.render() == refused
    assert checkout.status() == refused
    assert victim.read_text() == "precious\n"
    assert images(checkout.root) == before
    assert len(emulator.submissions) == sent
    assert not (checkout.root / STATE_DIR / "state.sqlite").exists()


@pytest.mark.parametrize(("output", "why"), [
    (".fluxbatch/state.sqlite", "images[2] is refused: output path '.fluxbatch/state.sqlite' is "
     "inside .fluxbatch/, where fluxbatch keeps the output root's state; images may not be "
     "written there"),
    (5, "images[2].output is not a str"),
])
def test_a_manifest_entrys_output_obeys_the_same_rules(checkout: Cli, output: Any,
                                                       why: str) -> None:
    manifest, document = manifest_of(checkout)
    entry(document, "grid/star.png")["output"] = output
    manifest.write_text(json.dumps(document))
    assert checkout.status() == Run(
        1, "", f"fluxbatch: {manifest}: the manifest is damaged: {why}. {RESTORE}")


def test_clean_delete_deletes_nothing_a_committed_manifest_points_outside_the_root(
        checkout: Cli, tmp_path: Path) -> None:
    """An orphan entry (an output the recipe no longer plans) whose path is outside."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    manifest, document = manifest_of(checkout)
    orphan = dict(entry(document, "grid/star.png"), output="grid/gone.png",
                  path="../victim.txt")
    document["images"].append(orphan)
    manifest.write_text(json.dumps(document))

    assert checkout.clean("--delete") == Run(
        1, "", f"fluxbatch: {manifest}: the manifest is damaged: images[4] is refused: output "
               f"path '../victim.txt' leaves the output root ('..'). {RESTORE}")
    assert victim.read_text() == "precious\n"


def test_merge_reads_nothing_another_roots_manifest_points_outside_it(
        checkout: Cli, emulator: Emulator, tmp_path: Path) -> None:
    """A shard's manifest names a file of the user's outside the shard as the star's image,
    with that file's sha256 and size: merge used to copy it into the outputs."""
    private = tmp_path / "private.png"
    private.write_bytes(png())
    manifest, document = manifest_of(checkout)
    entry(document, "grid/star.png").update(
        path="../private.png", sha256=hashlib.sha256(private.read_bytes()).hexdigest(),
        bytes=private.stat().st_size)
    manifest.write_text(json.dumps(document))
    (checkout.root / "grid" / "star.png").unlink()
    target = tmp_path / "merged"

    assert checkout("merge", str(checkout.recipe), "--out", str(target),
                    str(checkout.root)) == Run(
        1, "", f"fluxbatch: {manifest}: the manifest is damaged: images[2] is refused: output "
               f"path '../private.png' leaves the output root ('..'). {RESTORE}")
    assert private.read_bytes() == png()
    assert not (target / "grid" / "star.png").exists()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def test_render_deletes_nothing_through_a_link_out_of_the_root(
        checkout: Cli, emulator: Emulator, outside: Path) -> None:
    """A link committed in the project (`linked -> ../outside`) and a manifest entry under
    it: the path is lexically fine, but leads out of the root."""
    (outside / "star.png").write_bytes(b"the user's own file")
    (checkout.root / "linked").symlink_to(outside)
    manifest, document = manifest_of(checkout)
    entry(document, "grid/star.png")["path"] = "linked/star.png"
    manifest.write_text(json.dumps(document))
    sent = len(emulator.submissions)

    # The star is missing (its recorded file cannot be read), and the root holds no copy.
    assert checkout.render() == Run(0, checkout.written(1, up_to_date=3), "")
    assert len(emulator.submissions) == sent + 1
    assert (outside / "star.png").read_bytes() == b"the user's own file"
    assert sorted(check_manifest(checkout)) == ALL


def test_clean_delete_deletes_nothing_through_a_link_out_of_the_root(
        checkout: Cli, outside: Path) -> None:
    (outside / "gone.png").write_bytes(b"the user's own file")
    (checkout.root / "linked").symlink_to(outside)
    manifest, document = manifest_of(checkout)
    document["images"].append(dict(entry(document, "grid/star.png"), output="grid/gone.png",
                                   path="linked/gone.png"))
    manifest.write_text(json.dumps(document))

    assert checkout.clean("--delete") == Run(
        0, "orphan entry: linked/gone.png (refused: path 'linked/gone.png' leaves the output "
           "root through a symbolic link; nothing is deleted through it)\ndeleted 1 orphan\n",
        "")
    assert (outside / "gone.png").read_bytes() == b"the user's own file"
    assert sorted(check_manifest(checkout)) == ALL  # the entry is gone from the manifest


def test_an_image_is_never_placed_from_a_file_reached_through_a_link_out_of_the_root(
        checkout: Cli, emulator: Emulator, outside: Path) -> None:
    """The manifest says the star's image is also at `linked/copy.png` (with the sha256 and
    size of a file of the user's there): it is not read, and the star is paid for."""
    (outside / "copy.png").write_bytes(png())
    (checkout.root / "linked").symlink_to(outside)
    manifest, document = manifest_of(checkout)
    star = entry(document, "grid/star.png")
    document["images"].append(dict(star, output="other/star.png", path="linked/copy.png",
                                   sha256=hashlib.sha256(png()).hexdigest(),
                                   bytes=len(png())))
    manifest.write_text(json.dumps(document))
    (checkout.root / "grid" / "star.png").unlink()
    sent = len(emulator.submissions)

    assert checkout.render() == Run(0, checkout.written(1, up_to_date=3), "")
    assert len(emulator.submissions) == sent + 1
    with Image.open(checkout.root / "grid" / "star.png") as placed:
        assert placed.size != (7, 7)


@pytest.mark.parametrize("link", [".fluxbatch", ".fluxbatch/tmp", ".fluxbatch/blobs"])
def test_nothing_is_written_or_cleared_through_a_state_folder_that_is_a_link(
        cli: Cli, emulator: Emulator, outside: Path, link: str) -> None:
    """A link committed where fluxbatch keeps its state: `tmp/` is cleared at every render,
    which used to delete the files of the folder it led to."""
    (outside / "notes.txt").write_text("precious\n")
    (outside / "tmp").mkdir()
    (outside / "tmp" / "draft.txt").write_text("precious\n")
    linked = cli.root / link
    linked.parent.mkdir(parents=True, exist_ok=True)
    linked.symlink_to(outside)
    sent = len(emulator.submissions)

    assert cli.render() == Run(
        1, "", f"fluxbatch: {linked} is a symbolic link (to {outside}): fluxbatch keeps an "
               "output root's state only in real folders inside it, and writes, clears and "
               f"deletes nothing through a link. Remove the link (`rm {linked}`) and run "
               "again.\n")
    assert len(emulator.submissions) == sent
    assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*")) == [
        "notes.txt", "tmp", "tmp/draft.txt"]


# -- M1: a blob name in the ledger that is not a sha256 ---------------------------------------


def test_render_never_places_a_file_a_tampered_ledger_names_as_a_blob(
        rendered: Cli, emulator: Emulator, tmp_path: Path) -> None:
    """`blobs/../../private.png` is the user's file beside the root: render used to place it
    as the star's image. The task is collected again instead, at no cost."""
    private = tmp_path / "private.png"
    private.write_bytes(png())
    key = key_of(rendered, "grid/star.png")
    ledger(rendered, "UPDATE tasks SET blob = '../../private.png' WHERE key = ?", key)
    assert blob_path(rendered.root, "0" * 64).parent.parent.name == "blobs"
    (rendered.root / "grid" / "star.png").unlink()
    sent, polls = len(emulator.submissions), emulator.stats.polls

    assert rendered.render() == Run(0, collected(rendered, 1, up_to_date=3), "")
    assert len(emulator.submissions) == sent
    assert emulator.stats.polls > polls
    assert private.read_bytes() == png()
    with Image.open(rendered.root / "grid" / "star.png") as placed:
        assert placed.size != (7, 7)
    assert sorted(check_manifest(rendered)) == ALL


def test_clean_store_delete_never_deletes_a_file_a_tampered_ledger_names_as_a_blob(
        rendered: Cli, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    key = key_of(rendered, "grid/star.png")
    ledger(rendered, "UPDATE tasks SET blob = '../../victim.txt' WHERE key = ?", key)
    kept = [blob_path(rendered.root, str(blob)) for (blob,) in ledger(
        rendered, "SELECT blob FROM tasks WHERE key != ? AND blob IS NOT NULL", key)]
    size = sum(path.stat().st_size for path in kept)

    assert rendered.clean("--store", "--delete") == Run(
        0, "no orphans: every image of this recipe belongs to a job in it\n"
           f"removed 3 images ({size:,} bytes) from the content store\n", "")
    assert victim.read_text() == "precious\n"
    assert not any(path.exists() for path in kept)


@pytest.mark.parametrize("name", ["../../x", "A" * 64, "0" * 63, "0" * 64 + "/x", ""])
def test_a_blob_path_is_made_only_from_a_sha256(tmp_path: Path, name: str) -> None:
    with pytest.raises(Exception, match="is not a sha256; nothing is read or deleted"):
        blob_path(tmp_path, name)


# -- M8: a blob damaged on disk ----------------------------------------------------------------


def damage_blob(cli: Cli, path: str) -> Path:
    """Flip a byte in the middle of the content store's copy of the image at `path`."""
    [(blob,)] = ledger(cli, "SELECT blob FROM tasks WHERE key = ?", key_of(cli, path))
    kept = blob_path(cli.root, blob)
    data = bytearray(kept.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kept.write_bytes(bytes(data))
    return kept


def test_a_damaged_blob_is_dropped_and_its_task_collected_again_without_paying(
        rendered: Cli, emulator: Emulator) -> None:
    """It used to block its image forever, as "the provider's image is unusable"."""
    kept = damage_blob(rendered, "grid/star.png")
    (rendered.root / "grid" / "star.png").unlink()
    sent, polls = len(emulator.submissions), emulator.stats.polls

    assert rendered.render() == Run(0, collected(rendered, 1, up_to_date=3), "")
    assert len(emulator.submissions) == sent
    assert emulator.stats.polls > polls
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == kept.name  # downloaded again
    assert sorted(check_manifest(rendered)) == ALL
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")


def test_a_damaged_blob_of_a_task_that_cannot_be_polled_says_what_happens(
        rendered: Cli, emulator: Emulator) -> None:
    kept = damage_blob(rendered, "grid/star.png")
    ledger(rendered, "UPDATE tasks SET task_id = NULL, polling_url = NULL WHERE key = ?",
           key_of(rendered, "grid/star.png"))
    (rendered.root / "grid" / "star.png").unlink()
    sent = len(emulator.submissions)

    reason = (f"the downloaded image kept in {kept} was damaged on disk (its bytes no longer "
              "match their sha256), and no task is known to collect it from again: the next "
              "render pays for a new one")
    assert rendered.render() == Run(
        1, f"1 failed, 3 up to date; nothing paid; manifest {rendered.root}/rebuild.manifest."
           "json\n", aligned(("JOB", "VALUES", "OUTPUT", "STATUS", "REASON"),
                             [("grid", "shape=star colour=blue", "grid/star.png", "failed",
                               reason)]))
    assert not kept.exists()
    assert len(emulator.submissions) == sent


def unreadable(monkeypatch: pytest.MonkeyPatch, target: Path, code: int) -> None:
    """Reading `target` fails as a failing disk (EIO) or a file of another user (EACCES) would
    (the tests run as root, whom permissions do not stop)."""
    read_bytes = Path.read_bytes

    def failing(path: Path) -> bytes:
        if path == target:
            raise OSError(code, os.strerror(code), str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing)


def three_of_four(target: Path) -> str:
    return (f"rebuild: 3 of 4 images present; manifest {target / 'rebuild.manifest.json'}; "
            "`fluxbatch render` makes (or collects) the rest\n")


@pytest.mark.parametrize("fault", ["damaged", "unreadable"])
def test_merge_collects_the_task_of_a_damaged_or_unreadable_blob_instead_of_copying_it(
        rendered: Cli, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fault: str) -> None:
    """An unreadable one (a disk error) used to end in an internal error, with a traceback
    in a crash log."""
    kept = damage_blob(rendered, "grid/star.png")
    (rendered.root / "grid" / "star.png").unlink()
    target = tmp_path / "merged"
    sent = len(emulator.submissions)

    with monkeypatch.context() as patched:
        if fault == "unreadable":
            unreadable(patched, kept, errno.EIO)
        merged = rendered("merge", str(rendered.recipe), "--out", str(target),
                          str(rendered.root))
    said = "" if fault == "damaged" else (
        f", 1 unreadable\n  unreadable: {kept}: Input/output error; its task is recorded here, "
        "and `fluxbatch render` collects it without paying")
    assert merged == Run(int(fault == "unreadable"), f"{rendered.root}: 3 images placed, 1 task "
                         f"to collect{said}\n{three_of_four(target)}", "")
    assert rendered.render("--out", str(target)).code == 0
    assert len(emulator.submissions) == sent
    assert sorted(images(target)) == ALL


def test_merge_of_an_unreadable_image_without_a_task_leaves_it_out_in_a_line(
        rendered: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger(rendered, "UPDATE tasks SET task_id = NULL, polling_url = NULL")
    target = tmp_path / "merged"

    with monkeypatch.context() as patched:
        unreadable(patched, rendered.root / "solo" / "tree.png", errno.EACCES)
        merged = rendered("merge", str(rendered.recipe), "--out", str(target),
                          str(rendered.root))
    assert merged == Run(1, f"{rendered.root}: 3 images placed, 0 tasks to collect, "
                            "1 unreadable\n"
                            f"  unreadable: {rendered.root / 'solo' / 'tree.png'}: Permission "
                            f"denied; left out\n{three_of_four(target)}", "")
    assert sorted(images(target)) == ALL[:3]
    document = json.loads((target / "rebuild.manifest.json").read_text())
    assert sorted(entry["path"] for entry in document["images"]) == ALL[:3]


# -- M3: an output folder on another file system -------------------------------------------------


@pytest.fixture
def other_device(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than `tmp_path` (a tmpfs at /dev/shm)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to write across")
    try:
        folder = Path(os.path.realpath(shm)) / f"fluxbatch-test-{os.getpid()}-{tmp_path.name}"
        folder.mkdir()
    except OSError:
        pytest.skip("/dev/shm is not writable")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_file_is_written_atomically_across_two_file_systems(
        tmp_path: Path, other_device: Path) -> None:
    """A real EXDEV: the temporary file on one file system, the target on another."""
    target = tmp_path / "out" / "image.png"
    atomic_write(target, b"first", temp_dir=other_device)
    atomic_write(target, b"second", temp_dir=other_device)
    assert target.read_bytes() == b"second"
    assert os.listdir(other_device) == []
    assert os.listdir(target.parent) == ["image.png"]


def test_a_download_is_kept_across_two_file_systems(tmp_path: Path, other_device: Path) -> None:
    spooled = other_device / "download-1.part"
    spooled.write_bytes(b"bytes")
    sha256 = hashlib.sha256(b"bytes").hexdigest()
    kept = keep_blob(tmp_path, spooled, sha256)
    assert kept == blob_path(tmp_path, sha256)
    assert kept.read_bytes() == b"bytes"
    assert not spooled.exists()
    assert os.listdir(kept.parent) == [sha256]


@pytest.fixture
def cross_device(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every rename from one folder into another fails with EXDEV, as it does from
    `.fluxbatch/tmp/` into an output folder that is another mount (a Docker volume)."""
    real_replace = os.replace
    refused: list[tuple[str, str]] = []

    def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.dirname(os.fspath(source)) != os.path.dirname(os.fspath(target)):
            refused.append((os.fspath(source), os.fspath(target)))
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return refused


def test_a_render_into_folders_on_another_file_system_places_every_image(
        cli: Cli, emulator: Emulator, cross_device: list[tuple[str, str]]) -> None:
    """Every image used to be paid for and none placed, on every run."""
    sent = len(emulator.submissions)

    assert cli.render() == Run(0, cli.written(4), "")
    assert len(emulator.submissions) == sent + 4
    assert cross_device  # (the renames really were refused)
    assert sorted(check_manifest(cli)) == ALL
    assert cli.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    debris = [p.name for p in cli.root.rglob("*.tmp")]
    assert debris == []


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EACCES, errno.EPERM])
def test_a_placement_failure_that_would_hit_every_image_stops_submitting(code: int) -> None:
    fault = LocalFault.from_os_error("cannot write out/a.png", OSError(code, os.strerror(code)))
    assert fault.stops_run
    assert str(fault) == f"cannot write out/a.png: {os.strerror(code)}"


# -- the umask ------------------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[int]:
    mask = 0o027
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def test_images_and_manifests_follow_the_umask(cli: Cli, umask: int) -> None:
    """They were made 0644 whatever the umask (a 027 one means: no access for others)."""
    assert cli.render().code == 0
    written = [cli.root / path for path in ALL] + [cli.root / "rebuild.manifest.json"]
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == \
        {oct(0o666 & ~umask)}


# -- a password in the base URL -------------------------------------------------------------------


def test_a_password_in_the_base_url_is_never_recorded(cli: Cli, emulator: Emulator) -> None:
    secret = "s3cret-pass"
    with_password = emulator.base_url.replace("://", f"://user:{secret}@")
    assert main(["render", str(cli.recipe), "--base-url", with_password, "-q"]) == 0
    rows = ledger(cli, "SELECT base_url, polling_url FROM tasks")
    assert {base for base, _ in rows} == {emulator.base_url}
    for path in cli.root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_password_in_the_base_url_is_never_printed(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(cli.recipe), "--base-url", "ftp://user:s3cret@example.com"]) == 1
    assert capsys.readouterr().err == ("fluxbatch: --base-url: base URL 'ftp://example.com' "
                                       "must be an http(s) URL with a host\n")


def test_a_password_in_an_unreachable_base_url_is_never_printed(
        cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["render", str(cli.recipe), "-q", "--base-url",
                 f"http://user:s3cret@127.0.0.1:{port}"]) == 1
    assert capsys.readouterr().err == (
        f"fluxbatch: stopped: cannot reach http://127.0.0.1:{port}: Connection refused\n")
