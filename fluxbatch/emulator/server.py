"""The HTTP/1.1 server: asyncio streams + h11, keep-alive, one coroutine per connection.

Faults are injected here, around the work a route hands back, so the routes stay plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import random
import threading
import time
from http import HTTPStatus
from types import TracebackType
from typing import IO, Any

import h11

from fluxbatch.emulator import tasks
from fluxbatch.emulator.api import Api, Incoming, Reply, Routed, json_reply
from fluxbatch.emulator.config import EmulatorConfig

_log = logging.getLogger(__name__)

SERVER_NAME = "fluxbatch-emulator"
MAX_BODY = 64 * 1024 * 1024  # base64 input images can be large
IDLE_TIMEOUT = 120.0
_READ_SIZE = 64 * 1024
_SLOW_CHUNKS = 10
_SERVER_ERROR_STATUSES = (500, 502, 503)


class _BodyTooLarge(Exception):
    pass


class FaultDice:
    """Seeded, so a run with the same config and request order fails the same way."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._rate = config.fault_rate
        self._kinds = sorted(config.faults)
        self._submits = config.submit_faults
        self._rng = random.Random(f"{config.seed}:faults")

    def roll(self, is_submit: bool) -> str | None:
        if is_submit and not self._submits:
            return None
        kinds = [k for k in self._kinds if is_submit or k != "drop-after-submit"]
        if self._rate <= 0 or not kinds or self._rng.random() >= self._rate:
            return None
        return self._rng.choice(kinds)

    def server_error_status(self) -> int:
        return self._rng.choice(_SERVER_ERROR_STATUSES)


class Emulator:
    """The emulated BFL + CometAPI service on loopback: `async with Emulator(cfg) as emu:`."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.stats = tasks.Stats()
        self.submissions: list[dict[str, Any]] = []
        self.tasks = tasks.TaskTable(self.config)
        self._dice = FaultDice(self.config)
        self._api: Api | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._log_file: IO[str] | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        return self._started().base_url

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def credits(self) -> float:
        """The balance in credits: charged at each submit, moderated and failed tasks
        refunded (with several accounts, theirs added up)."""
        api = self._started()
        return sum(api.balance(key) for key in api.credits)

    def credits_of(self, key: str) -> float:
        """The balance of the account whose key is `key` (with several accounts)."""
        return self._started().balance(key)

    def reconfigure(self, **changes: Any) -> None:
        """Change knobs of a running emulator, for tasks it already holds too (tests: a
        delivery that fails, then works again; benchmarks: a cap that drops mid-run)."""
        self.config = dataclasses.replace(self.config, **changes)
        self.tasks.reconfigure(self.config)
        if self._api is not None:
            self._api.config = self.config

    def task(self, task_id: str) -> tasks.Task | None:
        """A task as the emulator sees it (tests peek at durations and outcomes)."""
        return self.tasks.get(task_id, time.monotonic())

    async def start(self) -> None:
        server = await asyncio.start_server(
            self._serve, self.config.host, self.config.port, backlog=4096
        )
        self._server = server
        port = server.sockets[0].getsockname()[1]
        if self.config.log is not None:
            self._log_file = open(self.config.log, "a", encoding="utf-8")  # noqa: SIM115
        self._api = Api(
            self.config,
            f"http://{self.config.host}:{port}",
            self.tasks,
            self.stats,
            self.submissions,
            self._log_file,
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _started(self) -> Api:
        if self._api is None:
            raise RuntimeError("the emulator has not been started")
        return self._api

    # -- one connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        if current is not None:
            self._connections.add(current)
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read(connection, reader)
                if request is None or not await self._answer(connection, writer, request):
                    return
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._send_quietly(
                connection,
                writer,
                json_reply(
                    exc.error_status_hint,
                    {"detail": str(exc) or HTTPStatus(exc.error_status_hint).phrase},
                ),
            )
        except _BodyTooLarge:
            await self._send_quietly(
                connection, writer, json_reply(413, {"detail": "Request Entity Too Large"})
            )
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            if current is not None:
                self._connections.discard(current)
            writer.close()

    async def _read(
        self, connection: h11.Connection, reader: asyncio.StreamReader
    ) -> Incoming | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    data = await reader.read(_READ_SIZE)
                connection.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _BodyTooLarge
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
                return Incoming(
                    head.method.decode("ascii"),
                    head.target.decode("latin-1"),
                    headers,
                    bytes(body),
                )
            else:  # ConnectionClosed, or PAUSED after the peer misbehaved
                return None

    async def _answer(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, request: Incoming
    ) -> bool:
        """Send the reply; False when the connection must be dropped instead."""
        routed = self._started().route(request)
        fault = None if routed.reply is not None else self._dice.roll(routed.is_submit)
        if fault is not None:
            self.stats.count_fault(fault)
        if fault == "drop":
            return False
        if routed.reply is not None:
            reply = routed.reply
        elif fault == "500":
            reply = self._started().server_error(routed.comet, self._dice.server_error_status())
        else:
            reply = await self._work(routed)
        if fault == "drop-after-submit":
            return False
        head_only = request.method == "HEAD"
        await self._send(connection, writer, reply, slow=fault == "slow", head_only=head_only)
        return True

    async def _work(self, routed: Routed) -> Reply:
        assert routed.work is not None
        try:
            return await routed.work()
        except Exception:
            _log.exception("fluxbatch emulator: unexpected error while answering a request")
            return json_reply(500, {"detail": "Internal Server Error"})

    async def _send(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        reply: Reply,
        slow: bool = False,
        head_only: bool = False,
    ) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("server", SERVER_NAME),
            *reply.headers,
        ]
        reason = HTTPStatus(reply.status).phrase.encode()
        head = connection.send(
            h11.Response(status_code=reply.status, headers=headers, reason=reason)
        )
        if head_only:
            writer.write(head)
        elif not slow:
            writer.write(head + connection.send(h11.Data(data=reply.body)))
        else:
            writer.write(head)
            step = max(1, -(-len(reply.body) // _SLOW_CHUNKS))
            chunks = [reply.body[i : i + step] for i in range(0, len(reply.body), step)] or [b""]
            for chunk in chunks:
                await asyncio.sleep(self.config.slow_fault_seconds / len(chunks))
                writer.write(connection.send(h11.Data(data=chunk)))
                await writer.drain()
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_quietly(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, reply: Reply
    ) -> None:
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
            await self._send(connection, writer, reply)


class EmulatorThread:
    """An Emulator on its own event loop in a background thread, for synchronous callers.

    `with EmulatorThread(cfg) as emu:` gives the running `Emulator`; read its `stats` and
    `submissions` freely (plain counters and lists), but call nothing async on it.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.emulator = Emulator(config)
        self._loop = asyncio.new_event_loop()
        # (in the context of its starter: the models a project adds, see models.get, are the
        # ones the render started with; a thread otherwise starts with an empty context)
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._run,), name="fluxbatch-emulator",
                                        daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Emulator:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.emulator

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.emulator.start())
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.emulator.stop())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
