"""The outbox: a small child process that sends every paid request (the submit POST) and
records its answer in the state store before anyone else hears of it.

Why a second process: between "the POST left" and "its answer is committed" lies a window in
which a killed process would forget a task it paid for. The outbox closes that window for
the common case — the render process being killed (SIGKILL, the OOM killer, a closed
terminal): the outbox runs in its own session, finishes the requests already handed to it,
commits their answers, and only then exits. It holds the output root's lock while it works,
so the next run waits for it instead of racing it. (If both processes die together — power
loss, `kill` of the whole group — the next run reports the job as *unknown*, never silently
pays again.)

Protocol: JSON lines. The parent writes one `hello` line (output root, provider, base URL,
run id), then per request a line (method, URL, headers and the body's `size`) followed by the
body's raw bytes: a body with image inputs is megabytes, and base64 inside JSON would hold
several copies of it at once in each process. The child answers each request with a line
(the response, or the transport error's class and message), after committing it. A body cut
short (the parent died while writing it) is never sent.

With a shared store, the request's line carries this run's claim on the key. The child makes
it (a conditional create) right before sending, as it records "submitting": a claim another
run holds is answered as such, and nothing is sent. Once the answer is committed, the child
writes the task into the claim. A render killed at any moment therefore leaves no claim of a
request that was never sent, and every claim of one that was gets its task, which another
run of the same account can collect.

The child answers every request it was handed, whatever fails: a state store that cannot
record (a full disk) is said in the answer, and the run stops; its own log, which may be on
that same full disk, is written on a best-effort basis and never stands between a request
and its answer.

The parent watches the child: if it dies, the parent hears of it at once (its pipe closes),
settles each request it had handed over from what the store says (the answer was committed:
the task is collected; "submitting" was committed: unknown; nothing: never sent, so safe to
send again), and starts a new outbox for the next submit — a few times, then it stops the run.
Every wait on the child is bounded (`ANSWER_TIMEOUT`): a child that does not answer in time
is stopped, what it held is settled the same way, and the run stops submitting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fluxbatch import providers
from fluxbatch.errors import FluxbatchError, StateError
from fluxbatch.layout import OUTBOX_LOG, state_path
from fluxbatch.providers import Submitted, credits, responses
from fluxbatch.state.ledger import TaskStatus
from fluxbatch.state.shared import Claim, CorruptObject, SharedStore, StoreError, entry_json
from fluxbatch.state.store import Store
from fluxbatch.wire import NOT_SENT, Wire

MAX_STARTS = 4  # an outbox that dies this often is not dying by accident: stop the run
# How long the child may take to answer a request (or to exit once told to): its sending is
# bounded by the wire's timeouts (connect 15 s, then 60 s without a byte) and its two commits
# by SQLite's busy timeout (30 s each); past this, it is stuck, not slow.
ANSWER_TIMEOUT = 300.0

_TRANSPORT_ERRORS: dict[str, type[httpx.TransportError]] = {
    cls.__name__: cls
    for cls in (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ReadTimeout,
                httpx.WriteTimeout, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.ProxyError,
                httpx.UnsupportedProtocol, httpx.NetworkError, httpx.TimeoutException,
                httpx.ProtocolError)
}


# -- the child ------------------------------------------------------------------------------


async def _serve(stdin: asyncio.StreamReader, stdout: Any) -> None:
    hello = json.loads(await stdin.readline())
    root = Path(hello["root"])
    # Only reads responses, so it needs no key (and is given none). Each request it sends
    # carries its own account's key, in its headers, and nothing else does.
    reader = providers.build(hello["provider"], base_url=hello["base_url"], environ={},
                             key=providers.Secret(""))
    store = Store.open(root)
    shared: list[SharedStore] = []  # opened at the first claim to update
    pending: set[asyncio.Task[None]] = set()
    parent_alive = [True]

    def reply(message: dict[str, Any]) -> None:
        if not parent_alive[0]:
            return
        try:
            stdout.write((json.dumps(message) + "\n").encode())
            stdout.flush()
        except (BrokenPipeError, OSError):
            parent_alive[0] = False

    async def handle(message: dict[str, Any], body: bytes, wire: Wire) -> None:
        """Answer the request, whatever happens (the parent waits for this answer)."""
        try:
            answer = await exchange(message, body, wire)
        except Exception as error:  # never a stray traceback: the parent hears of it
            _log(f"outbox: {type(error).__name__}: {error}")
            answer = {"error": "Outbox", "message": f"the outbox failed: {error}"}
        reply({"id": message["id"], **answer})

    async def exchange(message: dict[str, Any], body: bytes, wire: Wire) -> dict[str, Any]:
        key = message["key"]
        request = httpx.Request(message["method"], message["url"], headers=message["headers"],
                                content=body)
        if message.get("claim") and hello.get("store"):
            claimed = await _claim(hello["store"], shared, message["claim"])
            if claimed is not None:  # another run holds the key, or the store failed
                return claimed
        # Recorded by the process that sends, just before sending: a request that never left
        # is never mistaken for one that may have been billed.
        try:
            store.submitting(key, reader.info.name, reader.base_url, hello.get("run"),
                             message.get("account"))
        except StateError as error:  # nothing was sent
            return {"error": "StateError", "message": str(error)}
        try:
            response = await wire.send(request)
        except httpx.RequestError as error:  # (a huge answer too: it was sent)
            if isinstance(error, NOT_SENT):
                store.not_sent(key)
            elif not parent_alive[0]:
                store.ended(key, TaskStatus.UNKNOWN, f"the submit's answer was lost "
                            f"({type(error).__name__}) and the render process had gone")
            return {"error": type(error).__name__, "message": str(error)}
        answer = {"status": response.status_code,
                  "headers": list(response.headers.multi_items()),
                  "body": base64.b64encode(response.content).decode()}
        try:
            submitted = _record(store, reader, key, response, parent_alive[0])
        except StateError as error:
            # Left as "submitting": the next run reports it unknown, never pays it again. The
            # parent hears of it, and stops the run: no other answer could be recorded either.
            _log(f"outbox: {error}")
            answer["unrecorded"] = str(error)
            return answer
        if submitted is not None and message.get("claim") and hello.get("store"):
            answer.update(await _update_claim(hello["store"], shared, message["claim"],
                                              submitted))
        return answer

    async with Wire.open(16) as wire:  # as many connections as network.py's smallest pool
        while True:
            line = await stdin.readline()
            if not line.endswith(b"\n"):
                break  # the parent closed the pipe (finished, or died): finish and leave
            message = json.loads(line)
            try:
                body = await stdin.readexactly(message["size"])
            except asyncio.IncompleteReadError:
                break  # the parent died while handing this one over: it is not sent
            task = asyncio.ensure_future(handle(message, body, wire))
            pending.add(task)
            task.add_done_callback(pending.discard)
        parent_alive[0] = False
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    store.close()


def _record(store: Store, reader: providers.Provider, key: str, response: httpx.Response,
            parent_alive: bool) -> Submitted | None:
    """Commit the answer; the task it created, if it did."""
    answer = responses.submit_answer(response)  # (the executor's rule too)
    if answer == responses.SubmitAnswer.ACCEPTED:
        try:
            submitted = reader.read_submitted(response)
        except responses.BadResponse:
            return None  # left as "submitting": the parent (or the next run) reports it unknown
        store.submitted(key, submitted.task_id, submitted.polling_url, submitted.cost,
                        time.time())
        return submitted
    elif answer == responses.SubmitAnswer.REFUSED:
        store.not_sent(key)  # nothing was created
    elif not parent_alive:
        store.ended(key, TaskStatus.UNKNOWN, f"the provider answered HTTP "
                    f"{response.status_code} and the render process had gone")
    return None


async def _claim(url: str, shared: list[SharedStore],
                 claim: dict[str, Any]) -> dict[str, Any] | None:
    """Make this run's claim on the key (or find it made, by an earlier attempt of this very
    submit): None then, and the submit is sent. Otherwise the answer to give, nothing sent:
    what the store holds for the key (another run's), or the store's failure."""
    try:
        if not shared:
            shared.append(SharedStore.open(url))
        ours = Claim(**claim)
        found = await asyncio.to_thread(shared[0].claim, ours)
    except CorruptObject as error:
        return {"claim_lost": {"corrupt": str(error)}}
    except Exception as error:  # (StoreError, and a claim the parent garbled)
        return {"error": "SharedStore", "message": str(error)}
    if found is None or (isinstance(found, Claim) and found.id == ours.id):
        return None
    return {"claim_lost": {"entry": entry_json(found).decode()}}


async def _update_claim(url: str, shared: list[SharedStore], claim: dict[str, Any],
                        submitted: Submitted) -> dict[str, Any]:
    """Write the task into this run's claim in the shared store; what the answer says of it
    (the parent writes it itself when this could not)."""
    try:
        if not shared:
            shared.append(SharedStore.open(url))
        updated = dataclasses.replace(
            Claim(**claim), task_id=submitted.task_id,
            polling_url=providers.without_credentials(submitted.polling_url),
            cost=submitted.cost, submitted_at=time.time())
        await asyncio.to_thread(shared[0].update, updated)
    except Exception as error:  # (the store's errors, and a claim the parent garbled)
        _log(f"outbox: the shared store: {error}")
        return {"claim_unrecorded": str(error)}
    return {"claim_updated": True}


def _log(text: str) -> None:
    """Into outbox.log (the child's stderr), if it can be written: it may be on a full disk."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def child_main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await _serve(reader, sys.stdout.buffer)

    asyncio.run(run())
    return 0


# -- the parent's side ----------------------------------------------------------------------


class ClaimLost(Exception):  # (not an error: the image comes by another road)
    """The shared store holds the key (another run's claim, or its record): nothing was
    sent. `found` is what the store said: `{"entry": JSON}`, or `{"corrupt": why}`."""

    def __init__(self, found: dict[str, str]) -> None:
        super().__init__("claimed elsewhere")
        self.found = found


class Recovered(Exception):  # (not an error: a result that came by another road)
    """The outbox died after committing a submit's answer: here is the task it created."""

    def __init__(self, submitted: Submitted) -> None:
        super().__init__(submitted.task_id)
        self.submitted = submitted


class OutboxGone(FluxbatchError):
    """The outbox process keeps dying, or stopped answering: no submit can be sent with its
    answer recorded."""


class Unrecorded(StateError):
    """The outbox sent a submit but could not record what became of it (the state store
    refused the write, or the outbox itself failed): the task may exist, and be billed, while
    the ledger still says "submitting". Nothing else can be recorded either: stop the run."""


@dataclass(slots=True)
class _Handed:
    """A request handed to the child, waiting for its answer."""

    answer: asyncio.Future[dict[str, Any]]
    key: str
    at: float  # time.time() when handed over


class Outbox:
    """`send(request)` for paid requests, answered only after the child has committed."""

    def __init__(self, root: Path, provider: providers.Provider, lock_fd: int | None,
                 store: Store, *, run: str | None = None,
                 answer_timeout: float = ANSWER_TIMEOUT, shared: str | None = None,
                 claims: Callable[[str], Claim | None] | None = None) -> None:
        self.root = root
        self.shared = shared  # the shared store's URL: the child writes each task into its claim
        self.claims = claims or (lambda key: None)  # this run's claim on a key, if it holds one
        self.claims_updated: set[str] = set()  # keys whose claim the child gave its task
        self.run = run  # recorded with each submit: what this run spent
        self.provider = provider
        self.lock_fd = lock_fd
        self.store = store  # the parent's own connection: to settle requests a dead child held
        self.starts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._waiting: dict[int, _Handed] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._restart = asyncio.Lock()
        self.answer_timeout = answer_timeout
        self.stuck: str | None = None  # why the child was stopped for not answering

    @property
    def log(self) -> Path:
        return state_path(self.root, OUTBOX_LOG)

    async def start(self) -> None:
        self.starts += 1
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:  # (the child keeps its own copy of the descriptor)
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fluxbatch.outbox",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                start_new_session=True, limit=64 * 1024 * 1024,
                pass_fds=(self.lock_fd,) if self.lock_fd is not None else (),
            )
        hello = {"root": str(self.root), "provider": self.provider.info.name,
                 "base_url": self.provider.base_url, "run": self.run, "store": self.shared}
        await self._write(hello)
        self._reader = asyncio.ensure_future(self._read(self._process))

    async def close(self) -> None:
        """Let the child finish what it holds, and exit; stopped if it takes too long."""
        self._closing = True
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), self.answer_timeout)
        except TimeoutError:
            await self._stop_stuck(f"did not exit within {self.answer_timeout:.0f} s")
        except asyncio.CancelledError:
            pass
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._process = None

    def _running(self) -> bool:
        """Alive as far as we can tell: its answers pipe still open (it closes the moment
        the child dies, before the child is even reaped)."""
        process = self._process
        return process is not None and process.returncode is None and \
            process.stdin is not None and not process.stdin.is_closing() and \
            self._reader is not None and not self._reader.done()

    async def _ensure_running(self) -> None:
        """Start a new outbox if the last one died (a few times at most)."""
        async with self._restart:
            if self._running() or self._closing:
                return
            if self.stuck is not None:
                raise OutboxGone(
                    f"the outbox process (which sends every paid submit) {self.stuck}; "
                    f"stopped it. Nothing was paid twice; see {self.log}, then run again")
            if self.starts >= MAX_STARTS:
                raise OutboxGone(
                    f"the outbox process (which sends every paid submit) died {self.starts} "
                    f"times; stopping. Nothing was paid twice; see {self.log}, then run again")
            await self.start()

    def sender(self, key: str, account: str | None = None
               ) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
        async def send(request: httpx.Request) -> httpx.Response:
            return await self.send(request, key, account)

        return send

    async def send(self, request: httpx.Request, key: str,
                   account: str | None = None) -> httpx.Response:
        if not self._running():
            await self._ensure_running()
        if not self._running():  # (closing)
            # Nothing was handed over, so nothing was sent: as safe to retry as a refused
            # connection (and the executor treats it so).
            raise httpx.ConnectError("the outbox process is not running", request=request)
        self._next += 1
        ident = self._next
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = _Handed(future, key, time.time())
        try:
            answer = await asyncio.wait_for(
                self._hand_over(ident, key, request, future, account), self.answer_timeout)
        except TimeoutError:
            await self._stop_stuck(f"did not answer a submit within {self.answer_timeout:.0f} s")
            answer = future.result()  # (settled from the store)
        if answer.get("claim_updated"):
            self.claims_updated.add(key)
        if "recovered" in answer:
            raise Recovered(Submitted(**answer["recovered"]))
        if "claim_lost" in answer:  # nothing was sent
            raise ClaimLost(answer["claim_lost"])
        if answer.get("error") == "StateError":  # nothing was sent
            raise StateError(answer["message"])
        if answer.get("error") == "SharedStore":  # nothing was sent
            raise StoreError(answer["message"])
        if answer.get("error") == "Outbox" or "unrecorded" in answer:
            raise Unrecorded(answer.get("unrecorded") or answer["message"])
        if "error" in answer:
            error_class = _TRANSPORT_ERRORS.get(answer["error"], httpx.TransportError)
            raise error_class(answer["message"], request=request)
        return httpx.Response(answer["status"], headers=answer["headers"],
                              content=base64.b64decode(answer["body"]), request=request)

    async def _hand_over(self, ident: int, key: str, request: httpx.Request,
                         future: asyncio.Future[dict[str, Any]],
                         account: str | None = None) -> dict[str, Any]:
        claim = self.claims(key)
        await self._write({
            "id": ident, "key": key, "account": account, "method": request.method,
            "url": str(request.url), "headers": list(request.headers.multi_items()),
            "size": len(request.content),
            "claim": dataclasses.asdict(claim) if claim is not None else None,
        }, request.content)
        if self._reader is not None and self._reader.done():
            self._settle_waiting()  # the child died before this was handed over
        return await asyncio.shield(future)

    async def _stop_stuck(self, what: str) -> None:
        """The child stopped answering: kill it (it is ours), and settle what it held from
        what it committed, as for a child that died. No new one is started."""
        self.stuck = self.stuck or what
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            # (once reaped, it commits nothing more: then the store says all it did)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
        self._settle_waiting()

    async def _write(self, message: dict[str, Any], body: bytes = b"") -> None:
        assert self._process is not None and self._process.stdin is not None
        # (no await between the two writes: another request's bytes cannot come between)
        self._process.stdin.write((json.dumps(message) + "\n").encode())
        if body:
            self._process.stdin.write(body)
        with contextlib.suppress(ConnectionError):  # (a dead child: its reader settles it)
            await self._process.stdin.drain()

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        try:
            while True:
                line = await process.stdout.readline()
                if not line.endswith(b"\n"):
                    break  # the child exited: finished (we closed its stdin), or died
                answer = json.loads(line)
                handed = self._waiting.pop(answer["id"], None)
                if handed is not None and not handed.answer.done():
                    handed.answer.set_result(answer)
        finally:  # (whatever ended it: nobody waits for an answer that cannot come)
            self._settle_waiting()

    def _settle_waiting(self) -> None:
        for handed in self._waiting.values():
            if not handed.answer.done():
                handed.answer.set_result(self._settle(handed))
        self._waiting.clear()

    def _settle(self, handed: _Handed) -> dict[str, Any]:
        """The answer for a request the child held when it died, from what it committed."""
        try:
            task = self.store.task(handed.key)
        except StateError as error:  # cannot tell whether it left: it may have been billed
            return {"error": "RemoteProtocolError",
                    "message": f"the outbox process died and its record cannot be read: {error}"}
        if task is not None and task.updated_at >= handed.at:
            if task.status == TaskStatus.SUBMITTED and task.task_id and task.polling_url:
                return {"recovered": {"task_id": task.task_id, "cost": credits(task.cost),
                                      "polling_url": task.polling_url}}
            if task.status == TaskStatus.SUBMITTING:
                return {"error": "RemoteProtocolError",
                        "message": "the outbox process died while sending it"}
        return {"error": "ConnectError", "message": "the outbox process died before sending it"}


if __name__ == "__main__":
    sys.exit(child_main())
