"""A loopback HTTP/1.1 server that writes raw bytes, for tests of what fluxbatch's HTTP client
does on the wire: each test controls exactly what the client sees (`Connection: close`,
chunked bodies, a close or a reset at a chosen moment, no answer at all), and the server
counts the connections it accepts. Also a forwarding proxy (plain and CONNECT) that only ever
connects to loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

TLS = Path(__file__).parent / "data" / "tls"
CERT = TLS / "cert.pem"  # self-signed, CN=localhost, SAN DNS:localhost and IP:127.0.0.1
KEY = TLS / "key.pem"


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


# A handler answers one request (or doesn't); True keeps reading requests on the connection.
Handler = Callable[[Received, Peer], Awaitable[bool]]
# A raw handler gets the connection itself, before anything is read from it.
RawHandler = Callable[[Peer], Awaitable[None]]


class _Listener:
    """A server on a free loopback port; its connections' tasks are cancelled on exit."""

    ssl_context: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self: T) -> T:
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


T = TypeVar("T", bound=_Listener)


class Server(_Listener):
    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None, *,
                 raw: RawHandler | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.raw = raw
        self.ssl_context = ssl_context
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[Received] = []

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


class Proxy(_Listener):
    """An HTTP proxy on loopback: answers absolute-form requests itself (`proxied GET
    http://...`) and tunnels CONNECT to loopback targets only. `seen` lists what it was
    asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            method, target, _ = head.split("\r\n")[0].split(" ")
            self.seen.append(f"{method} {target}")
            if method != "CONNECT":
                body = f"proxied {method} {target}".encode()
                writer.write(reply(body))
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            assert host in ("127.0.0.1", "localhost"), "the test proxy connects to loopback only"
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                             int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
