"""The HTTP/1.1 transport fluxbatch sends through (via `Wire`, below): keep-alive
connections over asyncio and h11, with nothing in between.

Why not httpx's own transport: a render of N images makes about 5N requests (submit, a couple
of polls, a redirect and the download), and httpx's default transport (httpcore over anyio)
spends about 0.8 ms of CPU on each: it checks every pooled connection's socket before every
request, and wraps each read in several layers. This one spends about a fifth of that. It is
an `httpx.AsyncBaseTransport`, so what passes through it is still httpx's (requests,
responses, content decoding, error classes), and tests swap it for `httpx.MockTransport`.

What it does: HTTP/1.1 (h11 parses and frames every message), http and https (certificates
verified with httpx's default context: certifi, or SSL_CERT_FILE / SSL_CERT_DIR), keep-alive
per origin with a cap on open connections, httpx's connect / read / write / pool timeouts, and
httpx's exception classes, chosen as httpcore chooses them. What it leaves out: proxies and
HTTP/2 (fluxbatch's clients use neither), and streaming (bodies are read whole; an image is a
few MB).

A connection that the server closed while idle is noticed as soon as the event loop sees the
close, so a request is never written onto it — which matters for a submit, since a POST whose
connection breaks half-way is "may have been billed".
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import cast

import h11
import httpx

_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: the socket's bytes go straight into h11."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.received: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.lost: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by the transport -----------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Idle, open, and nothing unexpected arrived since the last response."""
        return not (self.eof or self.received or self.transport is None
                    or self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: httpx.Request, body: bytes,
                       timeouts: dict[str, float | None]) -> httpx.Response:
        url = request.url
        target = url.raw_path
        # h11 refuses a request it cannot frame (a newline in a header value...) before a
        # byte is written; the error is httpx's, as httpcore raises it.
        try:
            event = h11.Request(method=request.method.encode(), target=target,
                                headers=request.headers.raw)
            data = self.h11.send(event) or b""
            if body:
                data += self.h11.send(h11.Data(data=body)) or b""
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # (h11's message quotes the offending header value, which may be a key)
            raise httpx.LocalProtocolError("the request cannot be sent as HTTP/1.1: a header "
                                           "holds a forbidden character", request=request) from None
        assert self.transport is not None
        try:
            async with asyncio.timeout(timeouts.get("write")):
                self.transport.write(data)
                if self._writable is not None and not self._writable.done():
                    await self._writable
        except TimeoutError:
            raise httpx.WriteTimeout("timed out sending the request", request=request) from None
        if self.lost is not None and not self.received:
            raise httpx.WriteError(str(self.lost) or "connection lost", request=request)

        response: h11.Response | None = None
        chunks: list[bytes] = []
        read_timeout = timeouts.get("read")
        while True:
            try:
                received = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                message = str(error) if response is not None or not self.eof else (
                    "Server disconnected without sending a response.")
                raise httpx.RemoteProtocolError(message, request=request) from None
            if received is h11.NEED_DATA:
                await self._receive(request, read_timeout)
            elif isinstance(received, h11.Response):
                response = received
            elif isinstance(received, h11.Data):
                chunks.append(bytes(received.data))
            elif isinstance(received, h11.EndOfMessage):
                break
            elif isinstance(received, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            # h11.InformationalResponse (1xx): wait for the final one
        assert response is not None
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        else:
            self.close()  # `Connection: close`, a body read to EOF, an HTTP/1.0 server...
        return httpx.Response(response.status_code, headers=list(response.headers),
                              stream=httpx.ByteStream(b"".join(chunks)),
                              extensions={"http_version": b"HTTP/1.1",
                                          "reason_phrase": response.reason})

    async def _receive(self, request: httpx.Request, timeout: float | None) -> None:
        """Feed h11 the next bytes (b"" at end of stream), waiting up to `timeout`."""
        if not self.received and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading the response",
                                        request=request) from None
            finally:
                self._waiter = None
        if self.received:
            self.h11.receive_data(self.received.popleft())
        elif isinstance(self.lost, OSError):  # a reset, not a clean close
            raise httpx.ReadError(str(self.lost) or type(self.lost).__name__, request=request)
        else:
            self.h11.receive_data(b"")


class Transport(httpx.AsyncBaseTransport):
    """`Wire(Transport(max_connections=16))`. At most `max_connections` are open at once,
    across origins; idle ones are reused newest first."""

    def __init__(self, *, max_connections: int = 16,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{scheme}://'.", request=request)
        if not url.host:
            raise httpx.UnsupportedProtocol("Request URL is missing a host.", request=request)
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        connection = await self._acquire(origin, request, timeouts)
        try:
            response = await connection.exchange(request, body, timeouts)
        except BaseException:  # errors, and cancellation mid-exchange: never reuse it
            connection.close()
            self._release(connection)
            raise
        self._release(connection)
        return response

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    # -- the pool ------------------------------------------------------------------------

    async def _acquire(self, origin: Origin, request: httpx.Request,
                       timeouts: dict[str, float | None]) -> _Connection:
        if self._closed:
            raise RuntimeError("the transport is closed")
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                while True:
                    idle = self._idle.get(origin)
                    while idle:
                        connection = idle.pop()
                        if connection.reusable:
                            return connection
                        connection.close()
                        self._open -= 1
                    if self._open < self.max_connections or self._evict_idle():
                        break
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    try:
                        await waiter
                    except BaseException:
                        if waiter.done() and not waiter.cancelled():
                            self._wake_one()  # woken, but leaving: pass the turn on
                        else:
                            waiter.cancel()
                        raise
        except TimeoutError:
            raise httpx.PoolTimeout("timed out waiting for a free connection",
                                    request=request) from None
        self._open += 1
        try:
            return await self._connect(origin, request, timeouts.get("connect"))
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    def _evict_idle(self) -> bool:
        """Close an idle connection (the longest idle of the first origin that has one),
        making room for a new one."""
        for connections in self._idle.values():
            if connections:
                connections.pop(0).close()
                self._open -= 1
                return True
        return False

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable:  # (a closed one is never reusable)
            connection.close()
            self._open -= 1
        else:
            self._idle.setdefault(connection.origin, []).append(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: Origin, request: httpx.Request,
                       timeout: float | None) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        connection = _Connection(origin)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: connection, host, port, ssl=context,
                    server_hostname=host if context is not None else None)
        except TimeoutError:
            connection.close()
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}",
                                       request=request) from None
        except (OSError, ssl.SSLError, OverflowError, ValueError) as error:  # (port > 65535)
            connection.close()
            raise httpx.ConnectError(str(error) or type(error).__name__,
                                     request=request) from None
        return connection


# The errors raised before any byte of a request has left: nothing was sent, so nothing can
# have been billed. (All but the framing error may pass if the request is sent again.)
NOT_SENT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.LocalProtocolError)

TIMEOUT = httpx.Timeout(60.0, connect=15.0, pool=None)
MAX_REDIRECTS = 20  # as httpx
_AUTH_HEADERS = ("authorization", "x-key", "cookie", "proxy-authorization")


class Wire:
    """How fluxbatch sends a request: straight to a transport (`Transport`, or a test's
    `httpx.MockTransport`) with httpx's timeouts, the body read whole. It skips what
    `httpx.AsyncClient` adds on top (cookie jars, auth flows, event hooks), which fluxbatch
    never uses and which costs more CPU per request than this transport does."""

    def __init__(self, transport: httpx.AsyncBaseTransport,
                 timeout: httpx.Timeout = TIMEOUT) -> None:
        self.transport = transport
        self._timeouts = timeout.as_dict()

    @classmethod
    def open(cls, max_connections: int) -> Wire:
        return cls(Transport(max_connections=max_connections))

    async def send(self, request: httpx.Request) -> httpx.Response:
        request.extensions["timeout"] = self._timeouts
        response = await self.transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def get_following_redirects(self, request: httpx.Request) -> httpx.Response:
        """A GET, following redirects as a GET. A redirect to another origin (scheme, host,
        port) carries no credentials: no `Authorization`, no BFL `x-key`, no cookies."""
        response = await self.send(request)
        for _ in range(MAX_REDIRECTS):
            if not response.has_redirect_location:
                return response
            location = response.headers["location"]
            try:
                url = request.url.join(location)
            except httpx.InvalidURL as error:
                raise httpx.RemoteProtocolError(f"Invalid URL in location header: {error}.",
                                                request=request) from None
            headers = [(name, value) for name, value in request.headers.multi_items()
                       if name not in ("host", "content-length", "content-type")
                       and (_origin(url) == _origin(request.url) or name not in _AUTH_HEADERS)]
            request = httpx.Request("GET", url, headers=headers)
            response = await self.send(request)
        if not response.has_redirect_location:
            return response
        raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.", request=request)

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)
