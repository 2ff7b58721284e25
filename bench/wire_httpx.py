"""httpx's own transport (httpcore) in place of aiohttp, for `bench_wire.py` only.

`install()` replaces `Wire.open` so that every wire fluxbatch opens (the render's and the
outbox process's) sends through `httpx.AsyncHTTPTransport`, with the same two routes as
`wire.Routes`: GETs over a kept-alive pool of `max_connections`, anything else (a submit)
over a connection opened for it alone. Proxies and the failure classification stay out:
this measures CPU, nothing else. The outbox is a process of its own, so `bench_wire.py`
loads this module there through a `sitecustomize` when FLUXBATCH_BENCH_WIRE=httpx.
"""

from __future__ import annotations

import os

import httpx

from fluxbatch.wire import TIMEOUT, Wire


class _Routes(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int) -> None:
        self.kept_alive = httpx.AsyncHTTPTransport(limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections,
            keepalive_expiry=30.0))
        # max_keepalive_connections=0: httpcore closes the connection after its one exchange.
        self.one_shot = httpx.AsyncHTTPTransport(limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=0))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = self.kept_alive if request.method in ("GET", "HEAD") else self.one_shot
        return await route.handle_async_request(request)

    async def aclose(self) -> None:
        await self.kept_alive.aclose()
        await self.one_shot.aclose()


_ORIGINAL = Wire.__dict__["open"]


def _open(cls: type[Wire], max_connections: int, timeout: httpx.Timeout = TIMEOUT) -> Wire:
    # At least as many kept-alive connections as tasks in flight: each poll finds one idle.
    return cls(_Routes(max(max_connections, int(os.environ.get("BENCH_POOL", "0")))),
               timeout=timeout)


def install() -> None:
    Wire.open = classmethod(_open)  # type: ignore[method-assign, assignment, arg-type]


def uninstall() -> None:
    Wire.open = _ORIGINAL  # type: ignore[method-assign]


if os.environ.get("FLUXBATCH_BENCH_WIRE") == "httpx":
    install()
