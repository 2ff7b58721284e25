"""The outbox process is watched: when it dies, what it held is settled from the state store
(collected, unknown, or never sent), and a new one takes over — a few times, then the run
stops with one line. Never minutes of doomed retries."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from fluxbatch import providers
from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.identity import job_key
from fluxbatch.outbox import MAX_STARTS, Outbox, OutboxGone, Recovered
from fluxbatch.providers import ProviderInfo
from fluxbatch.state.store import Store
from tests.helpers import build_file_tree

ROOT = Path(__file__).resolve().parent.parent
KEY = "k" * 64


def request() -> httpx.Request:
    return httpx.Request("POST", "http://127.0.0.1:9/v1/flux-dev", json={"prompt": "x"})


@pytest.mark.parametrize(("row", "expected"), [
    ("submitted", Recovered), ("submitting", httpx.RemoteProtocolError),
    (None, httpx.ConnectError), ("older", httpx.ConnectError), ("other-key", httpx.ConnectError),
])
def test_a_request_a_dead_outbox_held_is_settled_from_what_it_committed(
        tmp_path: Path, row: str | None, expected: type[Exception]) -> None:
    """Committed answer: the task is collected (never paid again); "submitting" committed:
    it may have left, so unknown; nothing of this attempt committed: it never left, so it is
    as safe to send again as a refused connection."""
    provider = providers.build("emulator", base_url="http://127.0.0.1:9", environ={})
    with Store.open(tmp_path) as store:
        outbox = Outbox(tmp_path, provider, None, store)
        if row in ("submitted", "other-key", "older"):
            key = KEY if row != "other-key" else "e" * 64
            store.submitting(key, "emulator", "http://127.0.0.1:9")
            store.submitted(key, "task-9", "http://127.0.0.1:9/v1/get_result?id=task-9", 4.0,
                            time.time())
        elif row == "submitting":
            store.submitting(KEY, "emulator", "http://127.0.0.1:9")
        # as if committed by the child after the hand-over (or, "older", by an earlier run)
        moment = time.time() + (-60 if row == "older" else 60)
        store.db.execute("UPDATE tasks SET updated_at = ?", (moment,))

        async def send_to_a_dying_outbox() -> None:
            outbox.start = die_on_start(outbox)  # type: ignore[method-assign]
            try:
                await outbox.send(request(), KEY)
            finally:
                await outbox.close()

        with pytest.raises(expected) as caught:
            asyncio.run(send_to_a_dying_outbox())
    if expected is Recovered:
        assert isinstance(caught.value, Recovered)
        assert caught.value.submitted == providers.Submitted(
            "task-9", "http://127.0.0.1:9/v1/get_result?id=task-9", 4.0)


def die_on_start(outbox: Outbox):  # type: ignore[no-untyped-def]
    """An outbox whose child reads the request, then dies before answering it."""
    async def start() -> None:
        outbox.starts += 1
        outbox._process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdin.readline(); sys.stdin.readline()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        await outbox._write({"hello": True})
        outbox._reader = asyncio.ensure_future(outbox._read(outbox._process))
    return start


def test_an_outbox_that_keeps_dying_stops_the_run_with_one_line(tmp_path: Path) -> None:
    broken = ProviderInfo("no-such-provider", "broken", None, None, None)
    provider = providers.build("emulator", base_url="http://127.0.0.1:9", environ={})
    provider.info = broken  # the child cannot build it: it dies at once, every time
    seen: list[str] = []

    async def main() -> None:
        with Store.open(tmp_path) as store:
            outbox = Outbox(tmp_path, provider, None, store)
            for _ in range(5 * MAX_STARTS):  # (a send may find a dying child still alive)
                try:
                    await outbox.send(request(), KEY)
                except httpx.ConnectError as error:  # died before sending: safe to retry
                    seen.append(f"ConnectError: {error}")
                except OutboxGone as error:
                    seen.append(f"OutboxGone: {error}")
                    break
            await outbox.close()

    asyncio.run(main())

    log = tmp_path / ".fluxbatch" / "outbox.log"
    *refused, gone = seen
    assert set(refused) == {"ConnectError: the outbox process died before sending it"}
    assert gone == (f"OutboxGone: the outbox process (which sends every paid submit) died "
                    f"{MAX_STARTS} times; stopping. Nothing was paid twice; see {log}, then run "
                    "again")
    assert "KeyError: 'no-such-provider'" in log.read_text()  # its traceback, not the terminal's


def grid(name: str, images: int) -> str:
    """A recipe of `images` emulator images, `1.png` to `N.png`."""
    return f"""\
version: 1
name: {name}
provider: emulator
output: "{{{{ n }}}}.{{{{ ext }}}}"
defaults: {{model: flux-pro-1.1, width: 256, height: 256, output_format: png}}
jobs:
  - name: grid
    prompt: "image {{{{ n }}}}"
    matrix:
      n: {list(range(1, images + 1))}
"""


RECIPE = grid("outbox", 40)


def outbox_children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"fluxbatch.outbox" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_an_outbox_killed_mid_render_is_replaced_and_nothing_is_paid_twice(
        tmp_path: Path) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    config = EmulatorConfig(latency=0.3, latency_sigma=0.1, cap=4, max_side=64)
    with EmulatorThread(config) as emulator:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxbatch", "render", str(tmp_path / "recipe.yaml"),
             "--base-url", emulator.base_url, "-q", "-j", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            children = outbox_children(process.pid)
            if children and any(tmp_path.glob("*.png")):  # mid-run: some written already
                os.kill(children[0], signal.SIGKILL)
                killed = children[0]
            time.sleep(0.02)
        out, err = process.communicate(timeout=120)
        submissions = list(emulator.submissions)
    assert killed is not None, "the outbox was never seen alive mid-run"
    assert process.returncode in (0, 1), err.decode()
    plan = load_plan(str(tmp_path / "recipe.yaml"))
    keys = Counter(job_key(str(s["model"]), s["request"])  # type: ignore[arg-type]
                   for s in submissions)
    assert max(keys.values()) == 1, "a job was paid for twice"
    written = {p.name for p in tmp_path.glob("*.png")}
    # every image is written, except a submit that was on the wire when the outbox died
    # (unknown: reported, never silently sent again)
    assert len(written) >= len(plan.jobs) - 4
    assert process.returncode == 0 or b"unknown" in out + err
    said = (out + err).decode()
    assert "internal error" not in said
    assert "Traceback" not in said and "never retrieved" not in said  # (the outbox's own)


def test_a_request_cut_short_by_a_dying_parent_is_never_sent(tmp_path: Path) -> None:
    """The parent hands a request over as a line and then the body's bytes; if it dies in
    between, the child has a body too short, and must send nothing of it (and record no
    "submitting", which would hold the image back as maybe billed)."""
    import json

    with EmulatorThread(EmulatorConfig(latency=0.0)) as emulator:
        Store.open(tmp_path).close()
        hello = {"root": str(tmp_path), "provider": "emulator",
                 "base_url": emulator.base_url, "run": "r"}
        header = {"id": 1, "key": KEY, "method": "POST",
                  "url": f"{emulator.base_url}/v1/flux-dev",
                  "headers": [["content-type", "application/json"]], "size": 1000}
        child = subprocess.run(
            [sys.executable, "-m", "fluxbatch.outbox"], cwd=ROOT, timeout=60,
            input=(json.dumps(hello) + "\n" + json.dumps(header) + "\n").encode()
            + b'{"prompt": "a',  # 13 of the 1,000 bytes promised
            capture_output=True)
        assert child.returncode == 0, child.stderr
        assert child.stdout == b""
        assert emulator.stats.requests == 0
    with Store.open(tmp_path) as store:
        assert store.task(KEY) is None


# CometAPI's documented envelope; "500 with error.code invalid_request: do not retry, fix body"
COMET_BAD_BODY = {"error": {"message": "invalid size", "type": "comet_api_error", "param": "",
                            "code": "invalid_request"}}


@pytest.mark.parametrize(("status", "body", "recorded", "raised"), [
    (422, {"detail": "bad width"}, None, "JobFailed"),
    (429, {"detail": "busy"}, None, "JobFailed"),
    (500, COMET_BAD_BODY, None, "JobFailed"),  # CometAPI's 500 for a body it refuses
    (500, {"detail": "oops"}, "unknown", "_Unknown"),
    (500, {"error": {"message": "busy", "type": "comet_api_error", "code": ""}}, "unknown",
     "_Unknown"),
    (502, {"detail": "bad gateway"}, "unknown", "_Unknown"),
])
def test_the_outbox_and_the_executor_read_a_refused_submit_alike(
        tmp_path: Path, status: int, body: dict[str, object], recorded: str | None,
        raised: str) -> None:
    """One rule (`responses.submit_answer`): what the outbox commits for an answer, when the
    render process is gone, is what the executor concludes from it."""
    from fluxbatch.execute import _submit_error
    from fluxbatch.outbox import _record

    reader = providers.build("cometapi", base_url="https://api.cometapi.com", environ={},
                             key=providers.Secret("k"))
    response = httpx.Response(status, json=body, request=request())
    with Store.open(tmp_path) as store:
        store.submitting(KEY, "cometapi", "https://api.cometapi.com")
        _record(store, reader, KEY, response, parent_alive=False)
        task = store.task(KEY)
        assert (task.status if task else None) == recorded
    if status != 429:  # (the executor retries a 429 before it reads it as a refusal)
        assert type(_submit_error(response, None)).__name__ == raised


# -- a state store that cannot be written (a full disk) -----------------------------------------


class FullDisk:
    """A stream on a full disk: every write fails, as the outbox's log (its stderr) does."""

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_the_outbox_answers_a_submit_whose_answer_it_cannot_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills between "submitting" and the answer: the answer cannot be committed,
    and neither can the line the outbox logs about it. The parent must still hear of it (it
    waits for this answer, and no other will come), and hear that it was not recorded."""
    import io
    import json
    import sqlite3

    from fluxbatch.layout import DATABASE, STATE_DIR
    from fluxbatch.outbox import _serve
    from fluxbatch.state.database import state_error

    database = tmp_path / STATE_DIR / DATABASE
    full = state_error(database, sqlite3.OperationalError("database or disk is full"))

    def refuse(*args: object) -> None:
        raise full

    with EmulatorThread(EmulatorConfig(latency=0.0)) as emulator:
        Store.open(tmp_path).close()
        monkeypatch.setattr(Store, "submitted", refuse)
        monkeypatch.setattr(sys, "stderr", FullDisk())
        hello = {"root": str(tmp_path), "provider": "emulator", "base_url": emulator.base_url,
                 "run": "r"}
        body = b'{"prompt": "a teapot"}'
        header = {"id": 1, "key": KEY, "method": "POST", "url": f"{emulator.base_url}/v1/flux-dev",
                  "headers": [["content-type", "application/json"], ["x-key", "emulator"]],
                  "size": len(body)}
        answers = io.BytesIO()

        async def serve() -> None:
            stdin = asyncio.StreamReader()

            class Stdout:  # the parent, who closes the pipe once answered
                def write(self, data: bytes) -> None:
                    answers.write(data)
                    stdin.feed_eof()

                def flush(self) -> None:
                    pass

            stdin.feed_data((json.dumps(hello) + "\n" + json.dumps(header) + "\n").encode()
                            + body)
            await _serve(stdin, Stdout())

        asyncio.run(asyncio.wait_for(serve(), 120))  # (a guard: unanswered, this would hang)
        submitted = len(emulator.submissions)

    [line] = answers.getvalue().decode().splitlines()
    answer = json.loads(line)
    assert (answer["id"], answer["status"], answer["unrecorded"]) == (1, 200, str(full))
    assert submitted == 1
    monkeypatch.undo()
    with Store.open(tmp_path) as store:
        task = store.task(KEY)
        assert task is not None and task.status == "submitting"  # next run: unknown, held


def test_an_outbox_that_stops_answering_is_stopped_and_stops_the_run(tmp_path: Path) -> None:
    """Every wait on the outbox is bounded: a child that answers nothing (here, stopped by a
    signal) is killed once the bound has passed, what it held is settled from the store (it
    recorded nothing, so nothing left), and no new one is started."""
    provider = providers.build("emulator", base_url="http://127.0.0.1:9", environ={})
    seen: list[str] = []

    async def main() -> None:
        with Store.open(tmp_path) as store:
            outbox = Outbox(tmp_path, provider, None, store, answer_timeout=1.0)
            await outbox.start()
            assert outbox._process is not None
            os.kill(outbox._process.pid, signal.SIGSTOP)
            for _ in range(2):
                try:
                    await outbox.send(request(), KEY)
                except (httpx.ConnectError, OutboxGone) as error:
                    seen.append(f"{type(error).__name__}: {error}")
            await outbox.close()
            assert store.task(KEY) is None

    asyncio.run(asyncio.wait_for(main(), 120))  # (a guard: without the bound, this hangs)

    log = tmp_path / ".fluxbatch" / "outbox.log"
    assert seen == [
        "ConnectError: the outbox process died before sending it",
        "OutboxGone: the outbox process (which sends every paid submit) did not answer a "
        f"submit within 1 s; stopped it. Nothing was paid twice; see {log}, then run again"]


THREE = grid("full", 3)


# The submit case (a task held back: it may have been paid) is in the fast run
@pytest.mark.parametrize("moment", [pytest.param("poll", marks=pytest.mark.slow), "submit"])
def test_a_disk_that_fills_up_mid_run_stops_it_in_one_line_and_nothing_is_paid_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """The render and its outbox lose the right to write any file (a file-size limit of 0:
    every write fails, the log's too, as on a full disk) at a chosen moment: while the first
    task is polled (its answer recorded), or while its submit is answered (the answer cannot
    be recorded). Either way the run stops with one line and exit 1, and the next run
    collects what was recorded as paid and holds back what may have been paid; it never pays
    twice."""
    import resource

    build_file_tree(tmp_path, {"recipe.yaml": THREE})
    recipe = tmp_path / "recipe.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with EmulatorThread(EmulatorConfig(latency=0.0, max_side=64)) as emulator:
        command = [sys.executable, "-m", "fluxbatch", "render", str(recipe), "--base-url",
                   emulator.base_url, "-q", "-j", "1"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=env)
        api = emulator._api
        assert api is not None
        original = api._poll if moment == "poll" else api._submit
        filled: list[int] = []

        async def fill_the_disk_first(*args: object, **kwargs: object) -> object:
            if not filled:  # (the first task: -j 1, so the outbox holds nothing else)
                filled.extend([process.pid, *outbox_children(process.pid)])
                for pid in filled:
                    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0))
            return await original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(api, "_poll" if moment == "poll" else "_submit",
                            fill_the_disk_first)
        try:
            out, err = process.communicate(timeout=120)  # (a guard: it hung before the fix)
        finally:
            for pid in [*outbox_children(process.pid), process.pid]:
                if process.poll() is None:
                    os.kill(pid, signal.SIGKILL)
        monkeypatch.undo()
        assert len(filled) == 2, filled  # the render and its outbox
        first = subprocess.run(command, capture_output=True, env=env, timeout=120)
        submissions = list(emulator.submissions)

    database = tmp_path / ".fluxbatch" / "state.sqlite"
    assert (process.returncode, out.decode(), err.decode()) == (1, "", (
        f"fluxbatch: stopped: {database}: cannot record in the state store (disk I/O error). "
        "Free some space or make the folder writable, then run again: what was recorded is "
        f"kept, and nothing is paid twice. The manifest {tmp_path / 'full.manifest.json'} "
        "could not be written either (File too large); the next run writes it.\n"))
    keys = Counter(job_key(str(s["model"]), s["request"])  # type: ignore[arg-type]
                   for s in submissions)
    assert len(keys) == 3 and max(keys.values()) == 1, "a job was paid for twice"
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    manifest = tmp_path / "full.manifest.json"
    if moment == "poll":  # recorded as paid: collected by the next run, free
        assert (first.returncode, first.stdout.decode(), first.stderr.decode()) == (0, (
            "3 written; cost $0.080 (reported by the provider), and $0.040 paid by earlier runs "
            f"for the tasks collected; manifest {manifest}\n"), "")
        assert written == ["1.png", "2.png", "3.png"]
    else:  # its answer never recorded: maybe paid, so held back, never sent again blindly
        assert (first.returncode, first.stdout.decode(), first.stderr.decode()) == (1, (
            f"2 written, 1 held back; cost $0.080 (reported by the provider); manifest "
            f"{manifest}\n"), (
            "1 image held back: an earlier submit's outcome was never learned (it may have "
            "been billed). Re-run with --retry-unknown to submit it again.\n"))
        assert written == ["2.png", "3.png"]
