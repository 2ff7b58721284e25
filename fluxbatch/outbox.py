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

Protocol: JSON lines. The parent writes one `hello` line (database path, provider, base
URL), then one line per request; the child answers each with the response (or the transport
error's class and message), after committing it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from fluxbatch import providers
from fluxbatch.providers import responses
from fluxbatch.state import Store
from fluxbatch.transport import NOT_SENT, Wire

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
    # Only reads responses, so it needs no key (and is given none).
    reader = providers.build(hello["provider"], base_url=hello["base_url"], environ={},
                             key=providers.Secret(""))
    store = Store.open(root)
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

    async def handle(message: dict[str, Any], wire: Wire) -> None:
        output, key = message["output"], message["key"]
        request = httpx.Request(message["method"], message["url"], headers=message["headers"],
                                content=base64.b64decode(message["body"]))
        # Recorded by the process that sends, just before sending: a request that never left
        # is never mistaken for one that may have been billed.
        store.submitting(output, key, reader.info.name, reader.base_url)
        try:
            response = await wire.send(request)
        except httpx.TransportError as error:
            if isinstance(error, NOT_SENT):
                store.not_sent(output, key)
            elif not parent_alive[0]:
                store.ended(output, key, "unknown", f"the submit's answer was lost "
                            f"({type(error).__name__}) and the render process had gone")
            reply({"id": message["id"], "error": type(error).__name__, "message": str(error)})
            return
        _record(store, reader, output, key, response, parent_alive[0])
        reply({"id": message["id"], "status": response.status_code,
               "headers": list(response.headers.multi_items()),
               "body": base64.b64encode(response.content).decode()})

    async with Wire.open(16) as wire:  # as many connections as render.py's smallest pool
        while True:
            line = await stdin.readline()
            if not line:
                break  # the parent closed the pipe (finished, or died): finish and leave
            task = asyncio.ensure_future(handle(json.loads(line), wire))
            pending.add(task)
            task.add_done_callback(pending.discard)
        parent_alive[0] = False
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    store.close()


def _record(store: Store, reader: providers.Provider, output: str, key: str,
            response: httpx.Response, parent_alive: bool) -> None:
    if response.is_success:
        try:
            submitted = reader.read_submitted(response)
        except responses.BadResponse:
            return  # left as "submitting": the parent (or the next run) reports it unknown
        store.submitted(output, key, submitted.task_id, submitted.polling_url, submitted.cost,
                        time.time())
    elif response.status_code == 429 or 400 <= response.status_code < 500:
        store.not_sent(output, key)  # refused: nothing was created
    elif not parent_alive:
        store.ended(output, key, "unknown", f"the provider answered HTTP "
                    f"{response.status_code} and the render process had gone")


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


class Outbox:
    """`send(request)` for paid requests, answered only after the child has committed."""

    def __init__(self, root: Path, provider: providers.Provider, lock_fd: int | None) -> None:
        self.root = root
        self.provider = provider
        self.lock_fd = lock_fd
        self._process: asyncio.subprocess.Process | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fluxbatch.outbox",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True, limit=64 * 1024 * 1024,
            pass_fds=(self.lock_fd,) if self.lock_fd is not None else (),
        )
        hello = {"root": str(self.root), "provider": self.provider.info.name,
                 "base_url": self.provider.base_url}
        await self._write(hello)
        self._reader = asyncio.ensure_future(self._read())

    async def close(self) -> None:
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(asyncio.CancelledError):
            await process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._process = None

    def sender(self, output: str, key: str) -> Callable[[httpx.Request],
                                                        Awaitable[httpx.Response]]:
        async def send(request: httpx.Request) -> httpx.Response:
            return await self.send(request, output, key)

        return send

    async def send(self, request: httpx.Request, output: str, key: str) -> httpx.Response:
        process = self._process
        if process is None or process.returncode is not None or process.stdin is None \
                or process.stdin.is_closing():
            # Nothing was handed over, so nothing was sent: as safe to retry as a refused
            # connection (and the executor treats it so).
            raise httpx.ConnectError("the outbox process is not running", request=request)
        self._next += 1
        ident = self._next
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._write({
            "id": ident, "output": output, "key": key, "method": request.method,
            "url": str(request.url), "headers": list(request.headers.multi_items()),
            "body": base64.b64encode(request.content).decode(),
        })
        answer = await asyncio.shield(future)
        if "error" in answer:
            error_class = _TRANSPORT_ERRORS.get(answer["error"], httpx.TransportError)
            raise error_class(answer["message"], request=request)
        return httpx.Response(answer["status"], headers=answer["headers"],
                              content=base64.b64decode(answer["body"]), request=request)

    async def _write(self, message: dict[str, Any]) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(message) + "\n").encode())
        await self._process.stdin.drain()

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while True:
            line = await self._process.stdout.readline()
            if not line:
                break
            answer = json.loads(line)
            future = self._waiting.pop(answer["id"], None)
            if future is not None and not future.done():
                future.set_result(answer)
        for future in self._waiting.values():
            if not future.done():
                future.set_result({"error": "RemoteProtocolError",
                                   "message": "the outbox process ended unexpectedly"})
        self._waiting.clear()


if __name__ == "__main__":
    sys.exit(child_main())
