"""How fluxbatch sends HTTP: httpx requests and responses, carried by aiohttp.

Requests and responses are httpx's, so a test fakes the network with `httpx.MockTransport`.
Underneath is aiohttp, through httpx-aiohttp's transport (by httpx's maintainer). Measured on
whole renders, in turn (`bench/bench_wire.py`; docs/design.md, "Dependencies"): with httpx's
own transport (httpcore, its pool tuned) the client spent 1.9 x the CPU per image at 24 tasks
in flight and 3.1 x at 240, because httpcore checks every pooled connection before every
request.

Three rules keep a paid request paid once:

- A request that is not idempotent (a submit POST) goes over a connection opened for it
  alone. On a kept-alive connection that the server closed while it sat idle, a POST can
  break after it was written, and such a submit "may have been billed".
- Errors are classified from aiohttp's own exception. httpx-aiohttp (0.2) maps a reset or a
  read timeout to `httpx.ConnectTimeout`, which would read as "never sent" and be sent again.
  `NOT_SENT` lists the classes that really mean nothing left this machine.
- A redirect to another origin carries no credentials (no `x-key`, `Authorization` or
  cookies), and there are no cookie jars at all.

It honours HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY (`Routes`) and SSL_CERT_FILE /
SSL_CERT_DIR (else certifi's CA bundle). Bodies are bounded as they stream in: an API answer
over `MAX_ANSWER` bytes or an image over `MAX_IMAGE` bytes is refused, never held whole.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

TIMEOUT = httpx.Timeout(60.0, connect=15.0, pool=None)
MAX_REDIRECTS = 20  # as httpx
MAX_ANSWER = 1 << 20  # bytes; a submit, poll or error answer is a few hundred
MAX_IMAGE = 64 << 20  # bytes; a 4-megapixel PNG is about 12 MB
_AUTH_HEADERS = ("authorization", "x-key", "cookie", "proxy-authorization")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers that describe the bytes on the wire, not the decoded body a Response is built from.
_FRAMING = ("content-encoding", "content-length", "transfer-encoding")

# The errors raised before any byte of a request has left: nothing was sent, so nothing can
# have been billed. (All but the framing error may pass if the request is sent again.)
NOT_SENT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.LocalProtocolError,
    httpx.ProxyError, httpx.UnsupportedProtocol)

# aiohttp's failure → httpx's class, most specific first.
_CLASSES: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (aiohttp.ClientHttpProxyError, httpx.ProxyError),  # the proxy refused to connect us
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # DNS, refused, TLS handshake
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),  # connecting, or a pool slot
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),  # a reset or broken pipe mid-exchange
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
)


class BodyTooLarge(httpx.DecodingError):
    """A response body over its limit; it was not read past the limit."""


@dataclass(frozen=True, slots=True)
class Download:
    """A body streamed into a file: the final response (its own body read only when it is
    not a success, for the error message), and what was written."""

    response: httpx.Response
    size: int
    sha256: str


T = TypeVar("T")


class Wire:
    """`send` a request and read its answer, or `download` a body into a file; both follow
    nothing but what they are told to (`get_following_redirects`, `download`)."""

    def __init__(self, transport: httpx.AsyncBaseTransport | Routes, *,
                 timeout: httpx.Timeout = TIMEOUT) -> None:
        # One transport for everything (a test's MockTransport), or aiohttp's, by route.
        self.routes = transport if isinstance(transport, Routes) else None
        self.transport = transport if not isinstance(transport, Routes) else None
        self._timeouts = timeout.as_dict()

    @classmethod
    def open(cls, max_connections: int, timeout: httpx.Timeout = TIMEOUT) -> Wire:
        """Over aiohttp: a keep-alive pool of `max_connections` for GETs, a connection of its
        own for each other request, each through the proxy the environment names."""
        return cls(Routes(max_connections), timeout=timeout)
    async def send(self, request: httpx.Request, *, limit: int = MAX_ANSWER) -> httpx.Response:
        """The response, its body read whole (at most `limit` bytes, decoded)."""
        return await self._read_whole(request, await self._open(request), limit)

    async def get_following_redirects(self, request: httpx.Request, *,
                                      limit: int = MAX_ANSWER) -> httpx.Response:
        """A GET, following redirects as a GET. A redirect to another origin (scheme, host,
        port) carries no credentials: no `Authorization`, no BFL `x-key`, no cookies."""

        async def whole(final: httpx.Request, response: httpx.Response) -> httpx.Response:
            return await self._read_whole(final, response, limit)

        return await self._follow(request, whole)

    async def download(self, request: httpx.Request, sink: IO[bytes], *,
                       limit: int = MAX_IMAGE) -> Download:
        """A GET following redirects, its successful body streamed into `sink` (at most
        `limit` bytes) and hashed on the way."""

        async def stream(final: httpx.Request, response: httpx.Response) -> Download:
            if not response.is_success:
                return Download(await self._read_whole(final, response, MAX_ANSWER), 0, "")
            digest = hashlib.sha256()

            def take(chunk: bytes) -> None:
                digest.update(chunk)
                sink.write(chunk)

            size = await _drain(final, response, limit, "the image", take)
            return Download(_without_body(response, final), size, digest.hexdigest())

        return await self._follow(request, stream)

    async def _open(self, request: httpx.Request) -> httpx.Response:
        request.extensions["timeout"] = self._timeouts
        transport = self.routes.transport_for(request) if self.routes else self.transport
        assert transport is not None
        try:
            response = await transport.handle_async_request(request)
        except (httpx.TransportError, aiohttp.ClientError) as error:
            raise _classified(error, request) from None
        except ValueError as error:  # aiohttp refuses to frame a header (a line break in it)
            raise httpx.LocalProtocolError(
                "the request cannot be sent: a header holds a forbidden character",
                request=request) from error
        response.request = request
        return response

    async def _read_whole(self, request: httpx.Request, response: httpx.Response,
                          limit: int) -> httpx.Response:
        chunks: list[bytes] = []
        await _drain(request, response, limit, "the answer", chunks.append)
        return _without_body(response, request, b"".join(chunks))

    async def _follow(self, request: httpx.Request,
                      final: Callable[[httpx.Request, httpx.Response], Awaitable[T]]) -> T:
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._open(request)
            if not response.has_redirect_location:
                return await final(request, response)
            await self._read_whole(request, response, MAX_ANSWER)  # (discarded)
            request = _redirected(request, response)
        raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.", request=request)

    async def aclose(self) -> None:
        if self.routes is not None:
            await self.routes.aclose()
        elif self.transport is not None:
            await self.transport.aclose()

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _drain(request: httpx.Request, response: httpx.Response, limit: int, what: str,
                 take: Callable[[bytes], object]) -> int:
    """Hand the body's decoded chunks to `take`, refusing it past `limit` bytes; returns the
    size. The response is closed whatever happens."""
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"{what} is larger than {_size(limit)}", request=request)
            take(chunk)
    except (httpx.TransportError, aiohttp.ClientError) as error:
        raise _classified(error, request) from None
    finally:
        await response.aclose()
    return size


class Routes:
    """aiohttp transports by route: direct or through a proxy, kept alive (GET) or one
    connection per request (anything else).

    Proxies come from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY, read once, as the
    standard library reads them. aiohttp's own `trust_env` is not used: it would also read
    ~/.netrc, on a worker thread, at every request (a third of the client's CPU), and add
    its credentials to requests that carry their own key."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.proxies = urllib.request.getproxies_environment()
        self.context = httpx.create_ssl_context(trust_env=True)  # SSL_CERT_FILE, _DIR
        self._transports: dict[tuple[str | None, bool], AiohttpTransport] = {}

    def proxy_for(self, url: httpx.URL) -> str | None:
        # (proxy_bypass_environment is the standard library's NO_PROXY rule; typeshed omits it)
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if not self.proxies or bypass(url.host, self.proxies):
            return None
        return self.proxies.get(url.scheme) or self.proxies.get("all")

    def transport_for(self, request: httpx.Request) -> AiohttpTransport:
        proxy = self.proxy_for(request.url)
        kept_alive = request.method in ("GET", "HEAD")
        transport = self._transports.get((proxy, kept_alive))
        if transport is None:
            connector = {"limit": self.max_connections} if kept_alive else \
                {"force_close": True, "limit": 0}
            transport = AiohttpTransport(
                proxy=httpx.Proxy(proxy) if proxy else None, client=self._session(connector))
            self._transports[(proxy, kept_alive)] = transport
        return transport

    def _session(self, connector: dict[str, Any]) -> Callable[[], aiohttp.ClientSession]:
        # (called inside the running loop, at the first request, as aiohttp requires)
        return lambda: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.context, **connector),
            cookie_jar=aiohttp.DummyCookieJar())

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()


def _redirected(request: httpx.Request, response: httpx.Response) -> httpx.Request:
    location = response.headers["location"]
    try:
        url = request.url.join(location)
    except httpx.InvalidURL as error:
        raise httpx.RemoteProtocolError(f"Invalid URL in location header: {error}.",
                                        request=request) from None
    if url.scheme not in _DEFAULT_PORTS:  # (ftp://, file://...): never followed, nor retried
        raise httpx.UnsupportedProtocol(
            f"redirected to {url.scheme}://{url.netloc.decode()}, which is not http(s)",
            request=request)
    same_origin = _origin(url) == _origin(request.url)
    headers = [(name, value) for name, value in request.headers.multi_items()
               if name not in ("host", "content-length", "content-type")
               and (same_origin or name not in _AUTH_HEADERS)]
    return httpx.Request("GET", url, headers=headers)


def _without_body(response: httpx.Response, request: httpx.Request,
                  content: bytes = b"") -> httpx.Response:
    """A Response holding `content` (already decoded), detached from the connection."""
    headers = [(name, value) for name, value in response.headers.multi_items()
               if name.lower() not in _FRAMING]
    return httpx.Response(response.status_code, headers=headers, content=content,
                          request=request, extensions=response.extensions)


def _classified(error: Exception, request: httpx.Request) -> Exception:
    """The httpx error that says what really happened (see the module's docstring)."""
    cause = error.__cause__ if isinstance(error, httpx.TransportError) else error
    if not isinstance(cause, aiohttp.ClientError):
        return error  # already httpx's own (a test's MockTransport, say)
    message = _connect_failure(cause) or str(cause) or type(cause).__name__
    for aiohttp_class, httpx_class in _CLASSES:
        if isinstance(cause, aiohttp_class):
            return httpx_class(message, request=request)
    return httpx.RemoteProtocolError(message, request=request)  # unknown: it may have left


def _connect_failure(cause: aiohttp.ClientError) -> str | None:
    """`cannot connect to 127.0.0.1:9: Connection refused`, where aiohttp would say `Cannot
    connect to host 127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)]`. Left to
    aiohttp's own words: TLS and proxy failures, whose detail is the point."""
    if not isinstance(cause, aiohttp.ClientConnectorError) or \
            isinstance(cause, (aiohttp.ClientSSLError, aiohttp.ClientProxyConnectionError)):
        return None
    error = cause.os_error
    if isinstance(error, socket.gaierror) and error.strerror:
        reason = error.strerror  # `Name or service not known` (network_hint looks for it)
    elif error.errno and error.errno > 0:
        reason = os.strerror(error.errno)
    else:
        return None
    return f"cannot connect to {cause.host}:{cause.port}: {reason}"


def _size(limit: int) -> str:
    mebibytes, rest = divmod(limit, 1 << 20)
    return f"{mebibytes} MiB" if mebibytes and not rest else f"{limit:,} bytes"


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)
