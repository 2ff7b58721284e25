"""fluxbatch's HTTP/1.1 transport (asyncio + h11) and `Wire`, against real loopback servers.

Every server here is started by the test on 127.0.0.1 and writes hand-made HTTP/1.1 bytes, so
each test controls exactly what the client sees: `Connection: close`, chunked bodies, a close
or a reset at a chosen moment, or no answer at all. The server counts the connections it
accepts, so keep-alive and the pool's limit are checked from the other end of the socket.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxbatch.transport import MAX_REDIRECTS, Transport, Wire

TLS = Path(__file__).parent / "data" / "tls"
CERT = TLS / "cert.pem"  # self-signed, CN=localhost, SAN DNS:localhost and IP:127.0.0.1
KEY = TLS / "key.pem"

TIMEOUT = httpx.Timeout(2.0)  # a hang fails in 2 s rather than the default minute
CREDENTIALS = {"Authorization": "Bearer secret", "X-Key": "key-123", "Cookie": "session=abc",
               "Proxy-Authorization": "Basic cHJveHk="}
SENT_CREDENTIALS = {name.lower(): value for name, value in CREDENTIALS.items()}
CREDENTIAL_NAMES = list(SENT_CREDENTIALS)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run one test's coroutine; anything left hanging fails it within seconds."""

    async def bounded() -> None:
        await asyncio.wait_for(main, 5.0)

    asyncio.run(bounded())


# -- a loopback HTTP/1.1 server that writes raw bytes ---------------------------------------


@dataclass
class Received:
    """One request as the server read it."""

    method: str
    target: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    connection: int  # which accepted connection carried it: 0, 1, ...


@dataclass
class Peer:
    """The server's end of one accepted connection, for a handler to write on or break."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), not an orderly FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def until_client_closes(self) -> None:
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass


# A handler answers one request (or doesn't); True keeps reading requests on the connection.
Handler = Callable[[Received, Peer], Awaitable[bool]]
# A raw handler gets the connection itself, before anything is read from it.
RawHandler = Callable[[Peer], Awaitable[None]]


class Server:
    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None, *,
                 raw: RawHandler | None = None) -> None:
        self.handler = handler
        self.raw = raw
        self.ssl_context = ssl_context
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[Received] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self.accepted, reader, writer)
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            if self.raw is not None:
                await self.raw(peer)
                return
            while True:
                request = await read_request(reader, peer.index)
                if request is None:
                    break
                self.requests.append(request)
                if not await self.handler(request, peer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


async def read_request(reader: asyncio.StreamReader, connection: int) -> Received | None:
    """The next request on the connection, or None when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in filter(None, lines):
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers
        body = b"".join(parts)
    else:
        body = b""
    return Received(method, target, headers, body, connection)


def reply(body: bytes = b"", *, status: str = "200 OK", headers: Sequence[str] = ()) -> bytes:
    """A response framed with Content-Length."""
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def chunked(chunks: Sequence[bytes], *, headers: Sequence[str] = ()) -> bytes:
    head = ["HTTP/1.1 200 OK", "Transfer-Encoding: chunked", *headers]
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body + b"0\r\n\r\n"


def redirect(location: str, status: str = "302 Found") -> bytes:
    return reply(status=status, headers=[f"Location: {location}"])


def get(url: str, headers: dict[str, str] | None = None) -> httpx.Request:
    return httpx.Request("GET", url, headers=headers)


def free_port() -> int:
    """A loopback port nothing listens on: bound, then closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def server_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERT, KEY)
    return context


async def ok(request: Received, peer: Peer) -> bool:
    peer.send(reply(b"ok " + request.target.encode()))
    return True


# -- keep-alive, framing, bodies -------------------------------------------------------------


def test_sequential_requests_share_one_connection_with_both_framings() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/length":
            peer.send(reply(b"hello", status="201 Made Here",
                            headers=["X-Served: length", "Set-Cookie: a=1", "Set-Cookie: b=2"]))
        elif request.target == "/chunked":  # the chunks arrive in separate reads
            response = chunked([b"hello", b" ", b"chunked world"], headers=["X-Served: chunked"])
            for start in range(0, len(response), 20):
                peer.send(response[start:start + 20])
                await peer.writer.drain()
                await asyncio.sleep(0.005)
        else:
            peer.send(reply(request.body, headers=[f"X-Method: {request.method}"]))
        return True

    async def stream() -> AsyncIterator[bytes]:
        yield b"streamed "
        yield b"request"

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            first = await wire.send(get(server.url("/length"), {"X-Test": "one"}))
            assert (first.status_code, first.reason_phrase) == (201, "Made Here")
            assert first.http_version == "HTTP/1.1"
            assert first.headers["x-served"] == "length"
            assert first.headers.get_list("set-cookie") == ["a=1", "b=2"]
            assert first.content == b"hello"
            assert first.request.url == server.url("/length")

            second = await wire.send(get(server.url("/chunked")))
            assert second.status_code == 200
            assert second.headers["transfer-encoding"] == "chunked"
            assert second.content == b"hello chunked world"

            third = await wire.send(httpx.Request("POST", server.url("/echo?q=1"),
                                                  content=b"payload"))
            assert (third.content, third.headers["x-method"]) == (b"payload", "POST")

            fourth = await wire.send(httpx.Request("PUT", server.url("/echo"), content=stream()))
            assert (fourth.content, fourth.headers["x-method"]) == (b"streamed request", "PUT")

            assert server.accepted == 1
            assert [(r.method, r.target, r.connection) for r in server.requests] == [
                ("GET", "/length", 0), ("GET", "/chunked", 0), ("POST", "/echo?q=1", 0),
                ("PUT", "/echo", 0)]
            sent = server.requests[0].headers
            assert sent["x-test"] == "one"
            assert sent["host"] == f"127.0.0.1:{server.port}"
            assert server.requests[2].headers["content-length"] == "7"
            assert server.requests[3].headers["transfer-encoding"] == "chunked"

    run(main())


def test_large_bodies_both_ways_arrive_intact() -> None:
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB, every byte value, position-dependent
    assert len(payload) == 8 * 1024 * 1024

    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/chunked":  # echoed back in 1 MiB chunks
            size = 1024 * 1024
            peer.send(chunked([request.body[i:i + size]
                               for i in range(0, len(request.body), size)]))
        else:
            peer.send(reply(request.body))
        return True

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            for path in ("/length", "/chunked"):
                response = await wire.send(httpx.Request("POST", server.url(path),
                                                         content=payload))
                assert response.status_code == 200
                assert len(response.content) == len(payload)
                assert response.content == payload
            assert [len(r.body) for r in server.requests] == [len(payload)] * 2
            assert all(r.body == payload for r in server.requests)
            assert server.accepted == 1

    run(main())


def test_informational_response_then_final_one() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"final"))
        return True

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            response = await wire.send(httpx.Request("POST", server.url(), content=b"x"))
            assert (response.status_code, response.content) == (200, b"final")
            assert (await wire.send(get(server.url()))).content == b"final"
            assert server.accepted == 1

    run(main())


def test_head_response_has_no_body_and_the_connection_stays_usable() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.method == "HEAD":  # announces 5 bytes but, for HEAD, sends none
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        else:
            peer.send(reply(b"after"))
        return True

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            head = await wire.send(httpx.Request("HEAD", server.url()))
            assert (head.status_code, head.headers["content-length"], head.content) == (
                200, "5", b"")
            assert (await wire.send(get(server.url()))).content == b"after"
            assert server.accepted == 1

    run(main())


def test_body_delimited_by_close_is_read_whole_and_not_reused() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/until-close":  # neither Content-Length nor chunked
            peer.send(b"HTTP/1.1 200 OK\r\n\r\nall of ")
            await peer.writer.drain()
            await asyncio.sleep(0.02)
            peer.send(b"it")
            return False
        return await ok(request, peer)

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            assert (await wire.send(get(server.url("/until-close")))).content == b"all of it"
            assert (await wire.send(get(server.url("/next")))).content == b"ok /next"
            assert server.accepted == 2

    run(main())


@pytest.mark.parametrize("server_closes", [False, True])
def test_connection_close_response_is_not_reused(server_closes: bool) -> None:
    """`Connection: close` alone makes the client drop the connection, even when the server
    would have gone on reading from it."""

    async def main() -> None:
        first_closed = asyncio.Event()

        async def handler(request: Received, peer: Peer) -> bool:
            if request.target == "/close":
                peer.send(reply(b"bye", headers=["Connection: close"]))
                if server_closes:
                    return False
                await peer.writer.drain()
                await peer.until_client_closes()
                first_closed.set()
                return False
            return await ok(request, peer)

        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            response = await wire.send(get(server.url("/close")))
            assert (response.content, response.headers["connection"]) == (b"bye", "close")
            assert (await wire.send(get(server.url("/next")))).content == b"ok /next"
            assert [(r.target, r.connection) for r in server.requests] == [
                ("/close", 0), ("/next", 1)]
            if not server_closes:
                await asyncio.wait_for(first_closed.wait(), 1.0)

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_server_closing_an_idle_connection_is_noticed_before_the_next_request(
        how: str, tls: bool) -> None:
    """The server answers, then drops the kept-alive connection while it is idle: the next
    request — a POST, which must not be written onto a dead socket — goes out on a new one."""

    async def handler(request: Received, peer: Peer) -> bool:
        peer.send(reply(b"answer " + request.body))
        if request.connection == 0:
            await peer.writer.drain()
            await asyncio.sleep(0.03)
            if how == "reset":
                peer.reset()
            return False  # (`Server` closes it)
        return True

    async def main() -> None:
        server_context = server_tls() if tls else None
        transport = Transport(ssl_context=ssl.create_default_context(cafile=CERT))
        async with Server(handler, server_context) as server, Wire(transport, TIMEOUT) as wire:
            first = await wire.send(httpx.Request("POST", server.url("/submit"), content=b"1"))
            assert first.content == b"answer 1"
            await asyncio.sleep(0.1)
            second = await wire.send(httpx.Request("POST", server.url("/submit"), content=b"2"))
            assert second.content == b"answer 2"
            assert [(r.body, r.connection) for r in server.requests] == [(b"1", 0), (b"2", 1)]
            assert server.accepted == 2

    run(main())


def test_bytes_arriving_on_an_idle_connection_make_it_unusable() -> None:
    """Some servers send a `408 Request Timeout` on an idle connection before closing it. Such
    a connection is not reused, and the stray response is never taken for the next one's."""

    async def handler(request: Received, peer: Peer) -> bool:
        peer.send(reply(b"answer " + request.target.encode()))
        if request.connection == 0:
            await peer.writer.drain()
            await asyncio.sleep(0.03)
            peer.send(reply(b"stray", status="408 Request Timeout", headers=["Connection: close"]))
        return True  # and go on reading

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            assert (await wire.send(get(server.url("/one")))).content == b"answer /one"
            await asyncio.sleep(0.1)
            second = await wire.send(get(server.url("/two")))
            assert (second.status_code, second.content) == (200, b"answer /two")
            assert [(r.target, r.connection) for r in server.requests] == [
                ("/one", 0), ("/two", 1)]

    run(main())


# -- failures ---------------------------------------------------------------------------------


def test_server_closing_without_answering_is_a_remote_protocol_error() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/silent":
            return False  # read the whole request, then close (FIN), no response
        return await ok(request, peer)

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(max_connections=1),
                                                   TIMEOUT) as wire:
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await wire.send(httpx.Request("POST", server.url("/silent"), content=b"x"))
            assert str(caught.value) == "Server disconnected without sending a response."
            assert caught.value.request.url == server.url("/silent")
            # the pool's only slot was given back
            assert (await wire.send(get(server.url("/after")))).content == b"ok /after"
            assert server.accepted == 2

    run(main())


def test_server_closing_mid_body_is_a_remote_protocol_error() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        return False  # an orderly close (FIN) 900 bytes short

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await wire.send(get(server.url()))
            assert str(caught.value) == ("peer closed connection without sending complete "
                                         "message body (received 100 bytes, expected 1000)")

    run(main())


@pytest.mark.parametrize("sent_first", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                                            + b"x" * 100])
def test_server_resetting_the_connection_is_a_read_error(sent_first: bytes) -> None:
    """A reset (RST), before the response or half-way through its body, is a `ReadError`
    (as httpcore maps ECONNRESET), not the `RemoteProtocolError` of an orderly close."""

    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/after":
            return await ok(request, peer)
        peer.send(sent_first)
        await peer.writer.drain()
        await asyncio.sleep(0.03)  # the client has read what was sent
        peer.reset()
        return False

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(max_connections=1),
                                                   TIMEOUT) as wire:
            with pytest.raises(httpx.ReadError) as caught:
                await wire.send(get(server.url("/reset")))
            assert f"[Errno {errno.ECONNRESET}]" in str(caught.value)
            assert (await wire.send(get(server.url("/after")))).content == b"ok /after"

    run(main())


def test_write_timeout_when_the_server_does_not_read() -> None:
    async def stall(peer: Peer) -> None:
        await asyncio.sleep(10)  # accepts, never reads: the socket buffers fill up

    async def main() -> None:
        async with Server(ok, raw=stall) as server, Wire(Transport(),
                                                         httpx.Timeout(2.0, write=0.2)) as wire:
            started = time.perf_counter()
            with pytest.raises(httpx.WriteTimeout):
                await wire.send(httpx.Request("POST", server.url(), content=bytes(32 << 20)))
            assert 0.2 <= time.perf_counter() - started < 1.5

    run(main())


def test_reset_while_the_request_is_written_is_a_write_error() -> None:
    async def refuse_upload(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")  # the head, not the 32 MiB body
        peer.reset()

    async def main() -> None:
        async with Server(ok, raw=refuse_upload) as server, Wire(Transport(), TIMEOUT) as wire:
            with pytest.raises(httpx.WriteError) as caught:
                await wire.send(httpx.Request("POST", server.url(), content=bytes(32 << 20)))
            assert any(f"[Errno {number}]" in str(caught.value)
                       for number in (errno.ECONNRESET, errno.EPIPE))

    run(main())


def test_unsendable_header_is_an_httpx_local_protocol_error() -> None:
    """h11 refuses a header value with a newline (a key file with a second line, say); the
    error must be httpx's, as httpcore raises it, for callers that catch
    `httpx.TransportError`. Nothing reaches the server, and the pool's slot is given back."""

    async def main() -> None:
        async with Server(ok) as server, Wire(Transport(max_connections=1), TIMEOUT) as wire:
            bad = get(server.url("/bad"), {"X-Key": "sk-123\nsecond line"})
            with pytest.raises(httpx.LocalProtocolError, match="forbidden character") as caught:
                await wire.send(bad)
            assert "sk-123" not in str(caught.value)  # the message never quotes a header
            assert (await wire.send(get(server.url("/good")))).content == b"ok /good"
            assert [r.target for r in server.requests] == ["/good"]

    run(main())


def test_connection_refused_is_a_connect_error() -> None:
    async def main() -> None:
        async with Server(ok) as server, Wire(Transport(max_connections=1), TIMEOUT) as wire:
            with pytest.raises(httpx.ConnectError) as caught:
                await wire.send(get(f"http://127.0.0.1:{free_port()}/"))
            assert f"[Errno {errno.ECONNREFUSED}]" in str(caught.value)
            # the failed connect gave its slot back
            assert (await wire.send(get(server.url("/live")))).content == b"ok /live"

    run(main())


def test_connect_timeout() -> None:
    """A listener whose accept queue is full drops new SYNs (on Linux), so connecting hangs."""
    queue_never_filled = False

    async def main() -> None:
        nonlocal queue_never_filled
        loop = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            address = listener.getsockname()
            fillers: list[socket.socket] = []
            try:
                for _ in range(8):  # fill the queue until a connect hangs
                    filler = socket.socket()
                    fillers.append(filler)
                    filler.setblocking(False)
                    try:
                        await asyncio.wait_for(loop.sock_connect(filler, address), 0.1)
                    except TimeoutError:
                        break
                else:
                    queue_never_filled = True
                    return
                wire = Wire(Transport(), httpx.Timeout(2.0, connect=0.2))
                async with wire:
                    started = time.perf_counter()
                    with pytest.raises(httpx.ConnectTimeout):
                        await wire.send(get(f"http://127.0.0.1:{address[1]}/"))
                    assert 0.2 <= time.perf_counter() - started < 1.5
            finally:
                for filler in fillers:
                    filler.close()

    run(main())
    if queue_never_filled:
        pytest.skip("this system does not drop SYNs to a full accept queue")


def test_read_timeout_and_the_timed_out_connection_is_not_reused() -> None:
    async def main() -> None:
        abandoned = asyncio.Event()

        async def handler(request: Received, peer: Peer) -> bool:
            if request.target == "/never":
                await peer.until_client_closes()
                abandoned.set()
                return False
            return await ok(request, peer)

        async with Server(handler) as server, Wire(Transport(max_connections=1),
                                                   httpx.Timeout(2.0, read=0.2)) as wire:
            assert (await wire.send(get(server.url("/first")))).content == b"ok /first"
            started = time.perf_counter()
            with pytest.raises(httpx.ReadTimeout):
                await wire.send(get(server.url("/never")))
            assert 0.2 <= time.perf_counter() - started < 1.5
            await asyncio.wait_for(abandoned.wait(), 1.0)  # the client closed it
            assert (await wire.send(get(server.url("/then")))).content == b"ok /then"
            assert [(r.target, r.connection) for r in server.requests] == [
                ("/first", 0), ("/never", 0), ("/then", 1)]

    run(main())


def test_unsupported_scheme() -> None:
    async def main() -> None:
        async with Wire(Transport(), TIMEOUT) as wire:
            with pytest.raises(httpx.UnsupportedProtocol, match=r"'ftp://'"):
                await wire.send(get("ftp://127.0.0.1/file"))
            with pytest.raises(httpx.UnsupportedProtocol, match="missing a host"):
                await wire.send(get("http:///no-host"))

    run(main())


# -- the pool ---------------------------------------------------------------------------------


def test_pool_caps_open_connections_and_reuses_them() -> None:
    async def main() -> None:
        in_flight = 0
        most_in_flight = 0

        async def handler(request: Received, peer: Peer) -> bool:
            nonlocal in_flight, most_in_flight
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            await asyncio.sleep(0.1)
            in_flight -= 1
            return await ok(request, peer)

        async with Server(handler) as server, Wire(Transport(max_connections=2),
                                                   TIMEOUT) as wire:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(wire.send(get(server.url(f"/{n}"))) for n in range(6)))
            elapsed = time.perf_counter() - started
            assert [r.content for r in responses] == [f"ok /{n}".encode() for n in range(6)]
            assert server.max_open == 2  # never more than two sockets open at once ...
            assert server.accepted == 2  # ... and those two carried all six requests
            assert most_in_flight == 2
            assert elapsed >= 0.29  # three rounds of two

    run(main())


def test_idle_connections_are_reused_newest_first() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/slow":
            await asyncio.sleep(0.05)
        return await ok(request, peer)

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(max_connections=2),
                                                   TIMEOUT) as wire:
            await asyncio.gather(wire.send(get(server.url("/fast"))),
                                 wire.send(get(server.url("/slow"))))
            await wire.send(get(server.url("/next")))
            on = {r.target: r.connection for r in server.requests}
            assert on["/fast"] != on["/slow"]
            assert on["/next"] == on["/slow"]  # the one that went idle last
            assert server.accepted == 2

    run(main())


def test_pool_limit_spans_origins_and_evicts_idle_connections() -> None:
    async def main() -> None:
        async with Server(ok) as one, Server(ok) as two, Wire(Transport(max_connections=1),
                                                              TIMEOUT) as wire:
            assert (await wire.send(get(one.url("/a")))).content == b"ok /a"
            assert (await wire.send(get(two.url("/b")))).content == b"ok /b"
            await asyncio.sleep(0.05)
            assert (one.open, two.open) == (0, 1)  # the idle one was closed to make room
            assert (await wire.send(get(one.url("/c")))).content == b"ok /c"
            assert (one.accepted, two.accepted) == (2, 1)

    run(main())


def test_pool_timeout_then_the_pool_still_works() -> None:
    async def main() -> None:
        async def handler(request: Received, peer: Peer) -> bool:
            if request.target == "/slow":
                await asyncio.sleep(0.3)
            return await ok(request, peer)

        async with Server(handler) as server, Wire(Transport(max_connections=1),
                                                   httpx.Timeout(2.0, pool=0.05)) as wire:
            slow = asyncio.create_task(wire.send(get(server.url("/slow"))))
            await asyncio.sleep(0.05)  # /slow holds the only connection
            started = time.perf_counter()
            with pytest.raises(httpx.PoolTimeout):
                await wire.send(get(server.url("/starved")))
            assert 0.05 <= time.perf_counter() - started < 0.25
            assert (await slow).content == b"ok /slow"
            # the abandoned wait did not swallow the slot: the next one gets it at once
            assert (await wire.send(get(server.url("/next")))).content == b"ok /next"
            assert [(r.target, r.connection) for r in server.requests] == [
                ("/slow", 0), ("/next", 0)]

    run(main())


def test_waiters_get_the_connection_in_turn_after_one_gives_up() -> None:
    async def main() -> None:
        async def handler(request: Received, peer: Peer) -> bool:
            if request.target == "/slow":
                await asyncio.sleep(0.1)
            return await ok(request, peer)

        async with Server(handler) as server, Wire(Transport(max_connections=1),
                                                   TIMEOUT) as wire:
            slow = asyncio.create_task(wire.send(get(server.url("/slow"))))
            await asyncio.sleep(0.02)
            quitter = asyncio.create_task(wire.send(get(server.url("/quitter"))))
            patient = asyncio.create_task(wire.send(get(server.url("/patient"))))
            await asyncio.sleep(0.02)
            quitter.cancel()
            assert (await slow).content == b"ok /slow"
            assert (await patient).content == b"ok /patient"
            with pytest.raises(asyncio.CancelledError):
                await quitter
            assert [r.target for r in server.requests] == ["/slow", "/patient"]
            assert server.accepted == 1

    run(main())


class CancelOnReturn(httpx.AsyncBaseTransport):
    """Wraps a transport: as the response to a given path comes back, cancels a given task,
    in the same step of the event loop, before any task woken meanwhile has run."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.victims: dict[str, asyncio.Task[httpx.Response]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        victim = self.victims.pop(request.url.path, None)
        if victim is not None:
            victim.cancel()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_waiter_cancelled_right_after_its_wake_up_passes_the_turn_on() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/slow":
            await asyncio.sleep(0.05)
        return await ok(request, peer)

    async def main() -> None:
        transport = CancelOnReturn(Transport(max_connections=1))
        async with Server(handler) as server, Wire(transport,
                                                   httpx.Timeout(2.0, pool=0.5)) as wire:
            slow = asyncio.create_task(wire.send(get(server.url("/slow"))))
            await asyncio.sleep(0.01)
            woken = asyncio.create_task(wire.send(get(server.url("/woken"))))
            await asyncio.sleep(0.01)
            patient = asyncio.create_task(wire.send(get(server.url("/patient"))))
            await asyncio.sleep(0.01)
            transport.victims["/slow"] = woken  # woken first when /slow is done, then cancelled
            assert (await slow).content == b"ok /slow"
            assert (await patient).content == b"ok /patient"  # not a PoolTimeout
            assert woken.cancelled()
            assert [r.target for r in server.requests] == ["/slow", "/patient"]
            assert server.accepted == 1

    run(main())


def test_cancelled_request_frees_its_slot_and_closes_its_connection() -> None:
    async def main() -> None:
        abandoned = asyncio.Event()

        async def handler(request: Received, peer: Peer) -> bool:
            if request.target == "/never":
                await peer.until_client_closes()
                abandoned.set()
                return False
            return await ok(request, peer)

        async with Server(handler) as server, Wire(Transport(max_connections=1),
                                                   TIMEOUT) as wire:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(wire.send(get(server.url("/never"))), 0.1)
            await asyncio.wait_for(abandoned.wait(), 1.0)
            assert (await wire.send(get(server.url("/next")))).content == b"ok /next"
            assert [(r.target, r.connection) for r in server.requests] == [
                ("/never", 0), ("/next", 1)]

    run(main())


# -- redirects --------------------------------------------------------------------------------


def test_relative_and_same_origin_redirects_keep_credentials() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/start":
            peer.send(redirect("next?step=2", "307 Temporary Redirect"))
        elif request.target == "/next?step=2":
            peer.send(redirect(f"http://127.0.0.1:{peer.writer.get_extra_info('sockname')[1]}"
                               "/final"))
        else:
            peer.send(reply(b"final body", headers=["X-Final: yes"]))
        return True

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            headers = {**CREDENTIALS, "X-Other": "kept"}
            response = await wire.get_following_redirects(get(server.url("/start"), headers))
            assert (response.status_code, response.content) == (200, b"final body")
            assert response.headers["x-final"] == "yes"
            assert response.request.url == server.url("/final")
            assert [(r.method, r.target) for r in server.requests] == [
                ("GET", "/start"), ("GET", "/next?step=2"), ("GET", "/final")]
            for request in server.requests:
                assert {name: request.headers.get(name) for name in CREDENTIAL_NAMES} == (
                    SENT_CREDENTIALS)
                assert request.headers["x-other"] == "kept"
            assert server.accepted == 1  # redirects ride the kept-alive connection

    run(main())


@pytest.mark.parametrize("change", ["port", "host"])
def test_cross_origin_redirect_drops_credentials(change: str) -> None:
    async def main() -> None:
        async with Server(ok) as other:

            async def handler(request: Received, peer: Peer) -> bool:
                if request.target == "/go":
                    target = (other.url("/landed") if change == "port"
                              else f"http://localhost:{peer.writer.get_extra_info('sockname')[1]}"
                              "/landed")
                    peer.send(redirect(target, "301 Moved Permanently"))
                    return True
                return await ok(request, peer)

            async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
                headers = {**CREDENTIALS, "X-Other": "kept"}
                response = await wire.get_following_redirects(get(server.url("/go"), headers))
                assert response.content == b"ok /landed"
                landed = (other if change == "port" else server).requests[-1]
                assert landed.target == "/landed"
                assert response.request.url.path == "/landed"
                assert not set(CREDENTIAL_NAMES) & set(landed.headers)
                assert landed.headers["x-other"] == "kept"
                expected_host = "127.0.0.1" if change == "port" else "localhost"
                port = other.port if change == "port" else server.port
                assert landed.headers["host"] == f"{expected_host}:{port}"
                first = server.requests[0]  # the first hop still had them
                assert all(name in first.headers for name in CREDENTIAL_NAMES)

    run(main())


def test_credentials_dropped_once_stay_dropped_coming_back() -> None:
    async def main() -> None:
        async with Server(ok) as home, Server(ok) as away, Wire(Transport(), TIMEOUT) as wire:

            async def at_home(request: Received, peer: Peer) -> bool:
                if request.target == "/start":
                    peer.send(redirect(away.url("/away")))
                    return True
                return await ok(request, peer)

            async def bounce(request: Received, peer: Peer) -> bool:
                peer.send(redirect(home.url("/home")))
                return True

            home.handler, away.handler = at_home, bounce
            response = await wire.get_following_redirects(get(home.url("/start"), CREDENTIALS))
            assert response.content == b"ok /home"
            assert [r.target for r in home.requests] == ["/start", "/home"]
            assert [r.target for r in away.requests] == ["/away"]
            assert set(CREDENTIAL_NAMES) <= set(home.requests[0].headers)
            assert not set(CREDENTIAL_NAMES) & set(away.requests[0].headers)
            assert not set(CREDENTIAL_NAMES) & set(home.requests[1].headers)

    run(main())


@pytest.mark.parametrize("hops", [MAX_REDIRECTS, MAX_REDIRECTS + 1])
def test_redirect_limit(hops: int) -> None:
    """Twenty redirects are followed; the twenty-first is refused, as httpx does."""

    async def handler(request: Received, peer: Peer) -> bool:
        remaining = int(request.target.rsplit("/", 1)[1])
        peer.send(redirect(f"/hop/{remaining - 1}") if remaining else reply(b"arrived"))
        return True

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            request = get(server.url(f"/hop/{hops}"))
            if hops <= MAX_REDIRECTS:
                response = await wire.get_following_redirects(request)
                assert (response.status_code, response.content) == (200, b"arrived")
                assert response.request.url == server.url("/hop/0")
            else:
                with pytest.raises(httpx.TooManyRedirects):
                    await wire.get_following_redirects(request)
            assert len(server.requests) == MAX_REDIRECTS + 1

    run(main())


def test_redirect_without_location_is_returned_and_bad_location_is_an_error() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/no-location":
            peer.send(reply(b"see other", status="302 Found"))
        else:
            peer.send(redirect("http://127.0.0.1:port/"))
        return True

    async def main() -> None:
        async with Server(handler) as server, Wire(Transport(), TIMEOUT) as wire:
            response = await wire.get_following_redirects(get(server.url("/no-location")))
            assert (response.status_code, response.content) == (302, b"see other")
            with pytest.raises(httpx.RemoteProtocolError, match="Invalid URL in location"):
                await wire.get_following_redirects(get(server.url("/bad")))

    run(main())


# -- TLS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_with_a_trusted_certificate(host: str) -> None:
    async def main() -> None:
        trusting = ssl.create_default_context(cafile=CERT)
        async with Server(ok, server_tls()) as server, Wire(Transport(ssl_context=trusting),
                                                            TIMEOUT) as wire:
            for path in ("/one", "/two"):
                response = await wire.send(get(server.url(path, host)))
                assert (response.status_code, response.content) == (200, b"ok " + path.encode())
            assert server.accepted == 1  # kept alive over TLS as well

    run(main())


def test_https_verification_is_on_by_default() -> None:
    async def main() -> None:
        async with Server(ok, server_tls()) as server, Wire(Transport(), TIMEOUT) as wire:
            with pytest.raises(httpx.ConnectError) as caught:
                await wire.send(get(server.url()))
            assert "certificate verify failed" in str(caught.value)
            assert not server.requests

    run(main())
