"""The shared store (`--store`): never paying twice across output roots and machines.

Against a real S3-compatible server on loopback (moto's, one per module, a bucket per test;
it enforces `If-None-Match: *`), and against a shared folder (`file://`). The provider is the
bundled emulator on loopback: it counts every submit, which is what was paid."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import fluxbatch
from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.identity import job_key
from fluxbatch.main import main
from fluxbatch.outcomes import EventKind
from fluxbatch.state import migrations
from fluxbatch.state.shared import Claim, Claimant, Record, SharedStore
from fluxbatch.state.store import Store
from tests.helpers import Cli, Run, build_file_tree, sigkill_when, status_table
from tests.s3 import S3Server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, and the environment of a client of the loopback server (only)."""
    for name, value in s3.environ().items():
        monkeypatch.setenv(name, value)
    return s3.bucket()


@pytest.fixture
def url(bucket: str) -> str:
    return f"s3://{bucket}/team"


def root_cli(emulator: Emulator, capsys: pytest.CaptureFixture[str], root: Path) -> Cli:
    cli = Cli(emulator, capsys, root)
    cli.write()
    return cli


def filled(emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
           url: str) -> Cli:
    """Root `a`, rendered with the store: the store holds its 4 images."""
    a = root_cli(emulator, capsys, tmp_path / "a")
    assert a.render("--store", url).code == 0
    return a


def paid(emulator: Emulator, since: int) -> int:
    return len(emulator.submissions) - since


def keys_of(cli: Cli) -> set[str]:
    return {job.key for job in load_plan(str(cli.recipe)).jobs}


# -- the conditional create ------------------------------------------------------------------


def race(store_url: str, key: str, runs: int = 16) -> list[Claim | Record | None]:
    """`runs` threads claim one key at once, each with a store of its own."""
    stores = [SharedStore.open(store_url) for _ in range(runs)]
    stores[0].check()
    claims = [Claimant(root=f"root-{n}", provider="emulator", base_url=None,
                       account=None).claim(key) for n in range(runs)]
    barrier = threading.Barrier(runs)
    results: list[Claim | Record | None] = [None] * runs

    def claim(n: int) -> None:
        barrier.wait()
        results[n] = stores[n].claim(claims[n])

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [n for n, found in enumerate(results) if found is None]
    assert len(winners) == 1, results
    assert {found.id for found in results if isinstance(found, Claim)} == \
        {claims[winners[0]].id}
    return results


def test_racing_claims_on_s3_have_exactly_one_winner(s3: S3Server, url: str) -> None:
    key = "a" * 64
    race(url, key)
    conditional = [r for r in s3.requests if r.method == "PUT" and r.path.endswith(
        f"/keys/{key}.json")]
    assert len(conditional) == 16
    assert all("If-None-Match: *" in r.headers for r in conditional)


def test_racing_claims_on_a_shared_folder_have_exactly_one_winner(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    race(f"file://{tmp_path / 'shared'}", "b" * 64)


# -- two roots, one store ---------------------------------------------------------------------


@pytest.mark.parametrize("account", [None, "studio"])
def test_two_renders_at_once_pay_each_image_once(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str,
        account: str | None) -> None:
    """Both roots complete; each image is paid once. Through one account, the loser of a
    claim collects the winner's task; without a named account, it waits for its image."""
    a = root_cli(emulator, capsys, tmp_path / "a")
    b = root_cli(emulator, capsys, tmp_path / "b")
    environ = {**os.environ, **({"FLUXBATCH_ACCOUNT": account} if account else {})}
    before = len(emulator.submissions)

    async def both() -> list[fluxbatch.Report]:
        return list(await asyncio.gather(*(
            fluxbatch.arender(cli.recipe, base_url=emulator.base_url, store=url,
                              environ=environ) for cli in (a, b))))

    reports = asyncio.run(both())
    assert all(report.ok for report in reports), [r.outcomes for r in reports]
    assert paid(emulator, before) == len(keys_of(a)) == 4
    submitted = sum(1 for r in reports for o in r.outcomes if o.submitted_at is not None)
    assert submitted == 4
    for cli in (a, b):
        assert cli.status().code == 0
    # what each root's ledger says it spent: a task collected from another root's claim is
    # that root's spending, not this one's
    # (and a lost claim sent nothing: no reservation is left to count as maybe spent)
    for cli in (a, b):
        assert cli.render("--store", url).out.startswith("nothing to render")
    spent = [json.loads(cli("spend", str(cli.root), "--json").out)["total_usd"]
             for cli in (a, b)]
    assert sum(spent) == pytest.approx(4 * 0.04)


def test_a_third_root_pulls_everything_for_nothing(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        url: str) -> None:
    filled(emulator, capsys, tmp_path, url)
    c = root_cli(emulator, capsys, tmp_path / "c")
    before = len(emulator.submissions)
    assert c("pull", str(c.recipe), "--store", url) == Run(
        0, f"{url}: 4 images placed from the store, nothing paid; manifest "
           f"{c.root / 'rebuild.manifest.json'}\n", "")
    assert paid(emulator, before) == 0
    run = c.status()
    assert (run.code, run.err) == (0, "") and run.out.endswith("everything is up to date\n")
    # a render in yet another root takes them too, and says so
    d = root_cli(emulator, capsys, tmp_path / "d")
    assert d.render("--store", url) == Run(
        0, f"4 written (4 placed from the store); nothing paid; manifest "
           f"{d.root / 'rebuild.manifest.json'}\n", "")
    assert paid(emulator, before) == 0


def test_status_and_plan_count_the_stores_images_as_free(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        url: str) -> None:
    filled(emulator, capsys, tmp_path, url)
    c = root_cli(emulator, capsys, tmp_path / "c")
    run = c.status("--store", url, "-v")
    assert run.code == 1
    assert run.out.startswith(status_table(c.root, [("stored", 4)]))
    assert f"in the shared store {url}: placed from it at no cost" in run.out
    assert run.err == "not up to date: `fluxbatch render` makes them (4 to place or " \
                      "collect, at no cost)\n"
    planned = json.loads(c("plan", str(c.recipe), "--json", "--store", url).out)
    assert planned["summary"]["estimated_usd"] == 0
    assert {image["state"] for image in planned["jobs"]} == {"stored"}
    # without the store, nothing changes
    assert {image["state"] for image in json.loads(
        c("plan", str(c.recipe), "--json").out)["jobs"]} == {"new"}


def test_push_uploads_a_root_rendered_before_the_store(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        url: str) -> None:
    a = root_cli(emulator, capsys, tmp_path / "a")
    assert a.render().code == 0
    assert a("push", str(a.recipe), "--store", url) == Run(
        0, f"{url}: 4 images uploaded, 0 already there\n", "")
    assert a("push", str(a.recipe), "--store", url) == Run(
        0, f"{url}: 0 images uploaded, 4 already there\n", "")
    c = root_cli(emulator, capsys, tmp_path / "c")
    before = len(emulator.submissions)
    assert c("pull", str(c.recipe), "--store", url).code == 0
    assert paid(emulator, before) == 0
    assert "everything is up to date" in c.status().out


def test_pull_says_what_the_store_does_not_hold(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        url: str) -> None:
    a = root_cli(emulator, capsys, tmp_path / "a")
    assert a.render("--store", url, "--only", "solo").code == 0
    c = root_cli(emulator, capsys, tmp_path / "c")
    assert c("pull", str(c.recipe), "--store", url) == Run(
        0, f"{url}: 1 image placed from the store, nothing paid; manifest "
           f"{c.root / 'rebuild.manifest.json'}\n"
           "3 images are not in the store: `fluxbatch render` makes them\n", "")


# -- integrity ------------------------------------------------------------------------------


def corrupt_one(s3: S3Server, bucket: str, keep: int) -> str:
    """Cut one image in the store short (to `keep` bytes); the output whose image it was."""
    import s3fs

    fs = s3fs.S3FileSystem(key="fluxbatch-test", secret="fluxbatch-test",
                           endpoint_url=s3.endpoint, skip_instance_cache=True)
    records = [json.loads(data) for name, data in s3.objects(bucket) if "/keys/" in name]
    record = next(r for r in records if r["request"]["prompt"] == "a lone tree")
    path = f"{bucket}/team/blobs/{record['sha256'][:2]}/{record['sha256']}"
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:keep] if keep else data[:-1] + bytes([data[-1] ^ 1]))
    return "solo/tree.png"


@pytest.mark.parametrize("keep", [100, 0], ids=["truncated", "damaged"])
def test_a_corrupt_object_is_never_placed(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path, s3: S3Server,
        bucket: str, url: str, keep: int) -> None:
    filled(emulator, capsys, tmp_path, url)
    output = corrupt_one(s3, bucket, keep)
    before = len(emulator.submissions)
    c = root_cli(emulator, capsys, tmp_path / "c")
    run = c("pull", str(c.recipe), "--store", url)
    assert run.code == 1
    refused = [line for line in run.out.splitlines() if line.startswith("refused")]
    assert len(refused) == 1
    assert refused[0].startswith(f"refused: {output}: the store's copy of the image of key ")
    assert refused[0].endswith("does not match its sha256 (" + (
        "100 bytes" if keep else "") and "damaged or cut short; not placed")
    assert not (c.root / output).exists()
    if not keep:
        return  # (what a render does is the same for either damage)
    # a render refuses it too, and pays nothing for it
    d = root_cli(emulator, capsys, tmp_path / "d")
    run = d.render("--store", url)
    assert run.code == 1
    assert "damaged or cut short; not placed. `--force` pays for a new image, and " \
           "records it in the store" in run.err
    assert not (d.root / output).exists()
    assert paid(emulator, before) == 0
    # --force pays for that one, and mends the store
    assert d.render("--store", url, "--force", "--only", "solo").code == 0
    assert paid(emulator, before) == 1
    e = root_cli(emulator, capsys, tmp_path / "e")
    assert e("pull", str(e.recipe), "--store", url).code == 0
    assert (e.root / output).is_file()


# -- faults: the run stops before anything is paid ---------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_store_stops_the_run_before_paying(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # (botocore's own retries: fewer waits)
    a = root_cli(emulator, capsys, tmp_path / "a")
    before = len(emulator.submissions)
    run = a.render("--store", url)
    assert run.code == 1
    assert run.out == ""
    assert run.err.startswith(f"fluxbatch: the shared store {url} cannot be reached (")
    assert run.err.endswith("(while reading its marker); nothing was sent\n")
    assert run.err.count("\n") == 1
    assert paid(emulator, before) == 0
    assert not (a.root / "grid").exists()


def test_a_refusing_store_stops_the_run_before_paying(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        bucket: str) -> None:
    a = root_cli(emulator, capsys, tmp_path / "a")
    before = len(emulator.submissions)
    run = a.render("--store", "s3://no-such-bucket/team")
    assert run == Run(1, "", "fluxbatch: the shared store s3://no-such-bucket/team does not "
                             "exist (The specified bucket does not exist) (while reading its "
                             "marker); nothing was sent\n")
    missing = tmp_path / "not-mounted"
    run = a.render("--store", f"file://{missing}")
    assert run == Run(1, "", f"fluxbatch: the shared store file://{missing} does not exist "
                             f"(no folder {missing}) (while reading its marker); nothing was "
                             "sent\n")
    assert paid(emulator, before) == 0


def test_a_null_build_makes_no_store_request(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path, s3: S3Server,
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = filled(emulator, capsys, tmp_path, url)
    requests = s3.count()
    assert a.render("--store", url).out.startswith("nothing to render: 4 images up to date")
    assert a.status("--store", url).code == 0
    assert s3.count() == requests
    # (so a store that cannot be reached does not matter either)
    monkeypatch.setenv("FLUXBATCH_STORE", f"file://{tmp_path / 'nowhere'}")
    assert a.render().out.startswith("nothing to render: 4 images up to date")


def test_a_plan_kept_in_the_plan_cache_still_counts_what_the_store_holds(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path, s3: S3Server,
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root `c` renders one image without the store, and keeps its plan in the plan cache;
    the store holds the other three. `status`, `plan` and `render --dry-run` (the store named
    by --store, or by FLUXBATCH_STORE) count them as stored; the render places them for
    nothing; then a null build, its plan read back, asks the store nothing."""
    filled(emulator, capsys, tmp_path, url)
    c = root_cli(emulator, capsys, tmp_path / "c")
    before = len(emulator.submissions)
    assert c.render("--only", "solo") == Run(0, c.written(1), "")
    assert (c.root / ".fluxbatch" / "plan.rebuild.json").is_file()
    counted = status_table(c.root, [("up-to-date", 1), ("stored", 3)])
    assert c.status("--store", url).out.startswith(counted)
    monkeypatch.setenv("FLUXBATCH_STORE", url)
    assert c.status().out.startswith(counted)
    planned = json.loads(c("plan", str(c.recipe), "--json").out)
    assert sorted(image["state"] for image in planned["jobs"]) == \
        ["stored", "stored", "stored", "up-to-date"]
    dry = c.render("--dry-run")
    assert (dry.code, dry.err) == (0, "")
    assert dry.out.endswith("submit 0 images (estimated $0.00), re-attach 0, place 3 already "
                            "paid for, skip 1 up to date; nothing was sent or written\n")
    assert c.render() == Run(0, f"3 written (3 placed from the store), 1 up to date; nothing "
                                f"paid; manifest {c.root / 'rebuild.manifest.json'}\n", "")
    assert paid(emulator, before) == 1
    requests = s3.count()
    assert c.render().out.startswith("nothing to render: 4 images up to date")
    assert c.status().code == 0
    assert c("plan", str(c.recipe)).code == 0
    assert s3.count() == requests


def test_an_empty_store_variable_names_no_store(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXBATCH_STORE", "")
    a = root_cli(emulator, capsys, tmp_path / "a")
    assert a.render() == Run(0, a.written(4), "")


def test_the_store_never_receives_the_api_key(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path, s3: S3Server,
        bucket: str, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-fluxbatch-test-key-9f8e7d6c"
    monkeypatch.setenv("BFL_API_KEY", secret)
    monkeypatch.setenv("FLUXBATCH_ACCOUNT", "studio")
    a = root_cli(emulator, capsys, tmp_path / "a")
    a.recipe.write_text(a.recipe.read_text().replace("provider: emulator", "provider: bfl"))
    first = len(s3.requests)
    assert a.render("--store", url).code == 0
    sent = s3.requests[first:]
    assert len(sent) >= 16
    for request in sent:
        assert secret not in request.path and secret not in request.headers
        assert secret.encode() not in request.body
    for name, data in s3.objects(bucket):
        assert secret not in name and secret.encode() not in data
    claims = [json.loads(r.body) for r in sent if r.body.startswith(b'{"account"')]
    assert {claim["account"] for claim in claims} == {"studio"}


# -- claims left behind ------------------------------------------------------------------------


def write_entry(store_url: str, entry: Claim | Record) -> None:
    store = SharedStore.open(store_url)
    store.check()
    store.update(entry)


def silent_claim(key: str, root: str = "another-root") -> Claim:
    return Claim(key=key, id="c0ffee", provider="emulator", base_url=None, account=None,
                 host="ci-7", root=root, run=None, claimed_at=time.time() - 3600)


def test_a_silent_claim_is_held_back_until_retry_unknown(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A claim with no task, left by a run that died while submitting: it may have been
    billed, so it is never paid again silently; --retry-unknown takes it over, once."""
    (tmp_path / "shared").mkdir()
    store_url = f"file://{tmp_path / 'shared'}"
    a = root_cli(emulator, capsys, tmp_path / "a")
    tree = next(job for job in load_plan(str(a.recipe)).jobs if job.job == "solo")
    write_entry(store_url, silent_claim(tree.key))
    before = len(emulator.submissions)
    run = a.render("--store", store_url)
    assert run.code == 1
    assert paid(emulator, before) == 3
    assert "claimed in the shared store by a run on ci-7, since " in run.err
    assert "which recorded no task: it may have been billed. Held back; `--retry-unknown` " \
           "takes the claim over and pays" in run.err
    assert a.render("--store", store_url, "--retry-unknown").code == 0
    assert paid(emulator, before) == 4
    assert (tmp_path / "shared" / "takeovers" / f"{tree.key}.c0ffee").is_file()


def test_a_claim_this_root_left_without_a_task_is_its_own(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A run of this root claimed a key and died before sending it (its ledger says
    nothing was sent): the next run of the root takes its own claim back and pays."""
    (tmp_path / "shared").mkdir()
    store_url = f"file://{tmp_path / 'shared'}"
    a = root_cli(emulator, capsys, tmp_path / "a")
    a.root.mkdir(exist_ok=True)
    with Store.open(a.root) as store:
        root_id = store.root_id()
    tree = next(job for job in load_plan(str(a.recipe)).jobs if job.job == "solo")
    write_entry(store_url, silent_claim(tree.key, root=root_id))
    before = len(emulator.submissions)
    assert a.render("--store", store_url).code == 0
    assert paid(emulator, before) == 4


def schema_3_columns() -> dict[str, list[str]]:
    """Each table's columns in a store of schema 3: the store's schema, before accounts."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for migration in migrations.MIGRATIONS[:3]:
        migration.apply(db)
    return columns(db)


def columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                             "'table' ORDER BY name")]
    return {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            for table in tables}


def test_a_root_at_the_shared_stores_schema_upgrades_and_keeps_its_claims_and_tasks(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A root a render with a shared store left at schema 3 (before the account column): its
    id in the store's claims, a task in flight, and a claim it made of a key it never sent.
    Opened now, it migrates in place: the same root id, so the claim is its own and paid for
    once; the task is collected, not paid again; each key ends in the store's records."""
    (tmp_path / "shared").mkdir()
    url = f"file://{tmp_path / 'shared'}"
    a = root_cli(emulator, capsys, tmp_path / "a")
    assert a.render("--store", url, "--only", "solo").code == 0
    with Store.open(a.root) as store:
        root_id = store.root_id()
    grid = [job for job in load_plan(str(a.recipe)).jobs if job.job == "grid"]
    in_flight, claimed = grid[0], grid[1]
    answer = httpx.post(f"{emulator.base_url}/v1/{in_flight.model}",
                        json=dict(in_flight.request), headers={"x-key": "earlier-run"},
                        timeout=120).json()
    database = a.root / ".fluxbatch" / "state.sqlite"
    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE tasks DROP COLUMN account")
        db.execute("ALTER TABLE charges DROP COLUMN account")
        db.execute("UPDATE meta SET value = '3' WHERE name = 'schema'")
        db.execute("INSERT INTO tasks (key, status, provider, base_url, task_id, polling_url, "
                   "cost, submitted_at, updated_at) VALUES (?, 'submitted', 'emulator', ?, ?, "
                   "?, 4.0, ?, ?)", (in_flight.key, emulator.base_url, answer["id"],
                                     answer["polling_url"], time.time(), time.time()))
        assert columns(db) == schema_3_columns()
    write_entry(url, silent_claim(claimed.key, root=root_id))
    before = len(emulator.submissions)

    run = a.render("--store", url)

    assert (run.code, run.err) == (0, ""), run
    assert run.out.startswith("3 written, 1 up to date;")
    assert paid(emulator, before) == 2  # the claimed key and the one left; the task collected
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == \
            (str(migrations.LATEST),)
        assert db.execute("SELECT value FROM meta WHERE name = 'root_id'").fetchone() == \
            (root_id,)
        assert db.execute("SELECT status, account FROM tasks WHERE key = ?",
                          (in_flight.key,)).fetchone() == ("fetched", None)
    shared = SharedStore.open(url)
    assert all(isinstance(shared.lookup(key), Record) for key in keys_of(a))
    shared.close()


def test_another_accounts_claim_is_waited_for_and_placed_when_recorded(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A claim with a task of another account cannot be collected here: the render waits
    (shown as "waiting"), and places the image once the other run records it."""
    (tmp_path / "shared").mkdir()
    store_url = f"file://{tmp_path / 'shared'}"
    source = root_cli(emulator, capsys, tmp_path / "source")
    assert source.render("--store", store_url, "--only", "solo").code == 0
    shared = SharedStore.open(store_url)
    tree = next(job for job in load_plan(str(source.recipe)).jobs if job.job == "solo")
    record = shared.lookup(tree.key)
    assert isinstance(record, Record)
    claim = Claim(key=tree.key, id="other", provider="emulator", base_url=emulator.base_url,
                  account="elsewhere", host="laptop", root="other-root", run=None,
                  claimed_at=time.time(), task_id="t-1", polling_url="https://x.invalid/t",
                  submitted_at=time.time())
    shared.update(claim)
    a = root_cli(emulator, capsys, tmp_path / "a")
    before = len(emulator.submissions)
    waiting = []

    def on_event(event: fluxbatch.Event) -> None:
        if event.kind == EventKind.WAITING:
            waiting.append(event.detail)
            shared.update(record)  # the other run is done

    report = fluxbatch.render(a.recipe, base_url=emulator.base_url, store=store_url,
                              on_event=on_event, environ={"FLUXBATCH_ACCOUNT": "mine"})
    assert report.ok
    assert waiting == [f"claimed by {claim.describe()}"]
    assert paid(emulator, before) == 3
    assert [o.from_store for o in report.outcomes if o.job.key == tree.key] == [True]


# -- a runner killed mid-render ------------------------------------------------------------------

KILL_RECIPE = """\
version: 1
name: killed
provider: emulator
output: "{{ colour }}-{{ shape }}.{{ ext }}"
defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png}
jobs:
  - name: grid
    prompt: "a {{ colour }} {{ shape }}"
    matrix:
      colour: [red, green, blue, cyan]
      shape: [circle, square, star]
"""


def render_process(recipe: Path, base_url: str, store_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLUXBATCH_ACCOUNT": "studio"}
    return subprocess.Popen([sys.executable, "-m", "fluxbatch", "render", str(recipe),
                             "--base-url", base_url, "--store", store_url, "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_a_runner_killed_mid_render_then_another_runner_pays_nothing_twice(
        tmp_path: Path, url: str) -> None:
    """SIGKILL the render process (its outbox finishes the submits it holds, and writes
    their tasks into the claims), then render in another root through the same account:
    it collects the dead run's tasks instead of paying again. Then both roots complete."""
    with EmulatorThread(EmulatorConfig(latency=2.0, latency_sigma=0.05, max_side=64)) as emu:
        roots = [tmp_path / "a", tmp_path / "b"]
        for root in roots:
            build_file_tree(root, {"recipe.yaml": KILL_RECIPE})
        keys = {job.key for job in load_plan(str(roots[0] / "recipe.yaml")).jobs}
        process = render_process(roots[0] / "recipe.yaml", emu.base_url, url)
        sigkill_when(process, lambda: len(emu.submissions) >= 6)
        for root in [roots[1], roots[0], roots[1]]:  # the other root, the killed one, again
            done = render_process(root / "recipe.yaml", emu.base_url, url)
            out, err = done.communicate(timeout=120)
            assert done.returncode == 0, (out + err).decode()
        sent = [job_key(str(s["model"]), s["request"])  # type: ignore[arg-type]
                for s in emu.submissions]
        assert sorted(sent) == sorted(keys), "an image was paid twice, or never"
        for root in roots:
            assert main(["status", str(root / "recipe.yaml")]) == 0


# -- the recipe may not name one -----------------------------------------------------------------


def test_a_recipe_that_names_a_store_is_refused_at_validate(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Where renders go, and where images placed as paid come from, is the operator's
    choice: a recipe (from a pull request, say) cannot name a store, at its top or under its
    provider; and the provider mapping refuses any key it does not know."""
    recipe = build_file_tree(tmp_path, {"recipe.yaml": """\
version: 1
name: sneaky
store: s3://attacker/renders
provider: {name: emulator, store: "file:///tmp/x", concurency: 4}
defaults: {model: flux-pro-1.1}
jobs:
  - name: a
    prompt: a cat
"""}) / "recipe.yaml"
    assert main(["validate", str(recipe)]) == 1
    why = "a shared store is the operator's choice, never the recipe's: name it with " \
          "`--store URL` or FLUXBATCH_STORE where fluxbatch runs"
    assert capsys.readouterr().err == (
        f"{recipe}:3:1: store: unknown key 'store': {why}\n"
        f"{recipe}:4:28: provider.store: unknown key 'store': {why}\n"
        f"{recipe}:4:52: provider.concurency: unknown key 'concurency' (did you mean "
        "'concurrency'?)\n"
        f"{recipe}: 3 problems\n")


def test_an_image_from_the_store_costs_one_read_per_object(
        emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path, s3: S3Server,
        url: str) -> None:
    """`pull`: the marker, then per image its record and its bytes, one GET each (no HEAD
    first); `render` adds the claim that fails."""
    filled(emulator, capsys, tmp_path, url)
    for command, count in (("pull", 1 + 2 * 4), ("render", 1 + 3 * 4)):
        cli = root_cli(emulator, capsys, tmp_path / command)
        first = s3.count()
        args = ("--base-url", emulator.base_url) if command == "render" else ()
        assert cli(command, str(cli.recipe), "--store", url, *args).code == 0
        methods = sorted(r.method for r in s3.requests[first:])
        assert methods == sorted(["GET"] * (count - 4 * (command == "render")) +
                                 ["PUT"] * 4 * (command == "render")), methods
