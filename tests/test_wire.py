"""fluxbatch's `Wire` (httpx over aiohttp) against real loopback servers that write raw bytes:
keep-alive, bodies and their limits, what each failure is called (the pay-once rule rests on
it), redirects and credentials, TLS and proxies."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from fluxbatch.wire import MAX_REDIRECTS, NOT_SENT, BodyTooLarge, Wire, _classified
from tests.rawhttp import (
    CERT,
    Peer,
    Proxy,
    Received,
    Server,
    chunked,
    free_port,
    get,
    ok,
    redirect,
    reply,
    server_tls,
)

TIMEOUT = httpx.Timeout(2.0)  # a hang fails in 2 s rather than the default minute
CREDENTIALS = {"Authorization": "Bearer secret", "X-Key": "key-123", "Cookie": "session=abc",
               "Proxy-Authorization": "Basic cHJveHk="}
SENT_CREDENTIALS = {name.lower(): value for name, value in CREDENTIALS.items()}
CREDENTIAL_NAMES = list(SENT_CREDENTIALS)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run one test's coroutine; anything left hanging fails it within seconds."""

    async def bounded() -> None:
        await asyncio.wait_for(main, 10.0)

    asyncio.run(bounded())


def wire() -> Wire:
    return Wire.open(4, TIMEOUT)


def post(url: str, body: bytes = b"x") -> httpx.Request:
    return httpx.Request("POST", url, content=body)


# -- keep-alive and bodies ------------------------------------------------------------------


def test_gets_share_a_kept_alive_connection_and_each_post_gets_its_own() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/chunked":
            peer.send(chunked([b"hello", b" ", b"chunked world"]))
        else:
            peer.send(reply(request.method.encode() + b" " + request.body,
                            headers=["Set-Cookie: session=1"]))
        return True

    async def main() -> None:
        async with Server(handler) as server, wire() as w:
            first = await w.send(get(server.url("/a")))
            assert (first.status_code, first.content) == (200, b"GET ")
            assert (await w.send(get(server.url("/chunked")))).content == b"hello chunked world"
            assert (await w.send(post(server.url("/s"), b"1"))).content == b"POST 1"
            assert (await w.send(post(server.url("/s"), b"2"))).content == b"POST 2"
            assert (await w.send(get(server.url("/b")))).content == b"GET "
            by_connection = [(r.method, r.connection) for r in server.requests]
            gets = {c for m, c in by_connection if m == "GET"}
            posts = [c for m, c in by_connection if m == "POST"]
            assert len(gets) == 1 and len(set(posts)) == 2 and not gets & set(posts)
            # no cookie jar: what a server sets is never sent back
            assert all("cookie" not in r.headers for r in server.requests)

    run(main())


def test_large_bodies_both_ways_arrive_intact() -> None:
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB, every byte value, position-dependent

    async def handler(request: Received, peer: Peer) -> bool:
        peer.send(reply(request.body))
        return True

    async def main() -> None:
        async with Server(handler) as server, wire() as w:
            response = await w.send(post(server.url(), payload), limit=len(payload))
            assert response.content == payload
            assert server.requests[0].body == payload

    run(main())


@pytest.mark.parametrize("encoded", [False, True], ids=["plain", "gzip"])
def test_an_answer_over_its_limit_is_refused_while_it_streams_in(encoded: bool) -> None:
    """Counted after decoding: a small gzip bomb is as refused as a big body."""
    body = b"a" * 300_000
    sent = gzip.compress(body) if encoded else body

    async def handler(request: Received, peer: Peer) -> bool:
        headers = ["Content-Encoding: gzip"] if encoded else []
        peer.send(reply(sent, headers=headers))
        return True

    async def main() -> None:
        async with Server(handler) as server, wire() as w:
            assert (await w.send(get(server.url()), limit=300_000)).content == body
            with pytest.raises(BodyTooLarge, match="the answer is larger than 299,999 bytes"):
                await w.send(get(server.url()), limit=299_999)

    run(main())


def test_download_streams_into_a_file_follows_redirects_and_hashes() -> None:
    image = bytes(range(256)) * 1000

    async def handler(request: Received, peer: Peer) -> bool:
        if request.target == "/sample":
            peer.send(redirect("/durable/sample.png"))
        elif request.target == "/gone":
            peer.send(reply(b"<Error><Code>Expired</Code></Error>", status="403 Forbidden"))
        else:
            peer.send(reply(image, headers=["Content-Type: image/png"]))
        return True

    async def main() -> None:
        async with Server(handler) as server, wire() as w:
            sink = io.BytesIO()
            done = await w.download(get(server.url("/sample")), sink)
            assert (done.size, done.sha256) == (len(image), hashlib.sha256(image).hexdigest())
            assert sink.getvalue() == image
            assert done.response.headers["content-type"] == "image/png"
            assert done.response.request.url.path == "/durable/sample.png"

            sink = io.BytesIO()
            refused = await w.download(get(server.url("/gone")), sink)
            assert (refused.response.status_code, refused.size, sink.getvalue()) == (403, 0, b"")
            assert b"Expired" in refused.response.content

            with pytest.raises(BodyTooLarge, match="the image is larger than 1,000 bytes"):
                await w.download(get(server.url("/sample")), io.BytesIO(), limit=1000)

    run(main())


def test_an_idle_connection_the_server_closed_is_not_an_error_for_the_next_get() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        peer.send(reply(b"answer " + request.target.encode()))
        if request.connection == 0:
            await peer.writer.drain()
            await asyncio.sleep(0.05)
            peer.reset()
            return False
        return True

    async def main() -> None:
        async with Server(handler) as server, wire() as w:
            assert (await w.send(get(server.url("/one")))).content == b"answer /one"
            await asyncio.sleep(0.2)
            assert (await w.send(get(server.url("/two")))).content == b"answer /two"

    run(main())


# -- what a failure is called: "never sent" or "may have been billed" -----------------------


def never_sent(error: BaseException) -> bool:
    return isinstance(error, NOT_SENT)


@pytest.mark.parametrize("how", ["close", "reset", "half-answer"])
def test_a_post_broken_after_it_was_sent_is_never_called_unsent(how: str) -> None:
    """The rule the whole pay-once guarantee rests on: once a submit has left, any failure
    reads as "may have been billed", never as a connection that could not be opened."""

    async def handler(request: Received, peer: Peer) -> bool:
        if how == "half-answer":
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            await peer.writer.drain()
        if how == "reset":
            peer.reset()
        return False  # (`Server` closes it)

    async def main() -> None:
        async with Server(handler) as server, wire() as w:
            with pytest.raises(httpx.TransportError) as caught:
                await w.send(post(server.url("/v1/flux-dev")))
            assert not never_sent(caught.value), repr(caught.value)
            assert [r.method for r in server.requests] == ["POST"]

    run(main())


def test_a_post_whose_answer_never_comes_is_a_read_timeout_not_unsent() -> None:
    async def handler(request: Received, peer: Peer) -> bool:
        await asyncio.sleep(5)
        return False

    async def main() -> None:
        async with Server(handler) as server, Wire.open(4, httpx.Timeout(0.3)) as w:
            with pytest.raises(httpx.ReadTimeout) as caught:
                await w.send(post(server.url()))
            assert not never_sent(caught.value)
            assert len(server.requests) == 1

    run(main())


def test_connection_refused_is_a_connect_error_and_never_sent() -> None:
    async def main() -> None:
        async with wire() as w:
            with pytest.raises(httpx.ConnectError) as caught:
                await w.send(post(f"http://127.0.0.1:{free_port()}/v1/flux-dev"))
            assert never_sent(caught.value)

    run(main())


def test_an_unsendable_header_is_refused_before_anything_leaves() -> None:
    async def main() -> None:
        async with Server(ok) as server, wire() as w:
            bad = httpx.Request("POST", server.url("/bad"), content=b"x",
                                headers={"X-Key": "sk-123\nsecond line"})
            with pytest.raises(httpx.LocalProtocolError, match="forbidden character") as caught:
                await w.send(bad)
            assert never_sent(caught.value)
            assert "sk-123" not in str(caught.value)  # the message never quotes a header
            assert server.requests == []

    run(main())


def os_error(cls: type[aiohttp.ClientOSError]) -> aiohttp.ClientOSError:
    return cls(104, "Connection reset by peer")


def connector_error(cls: type[aiohttp.ClientConnectorError]) -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("api.bfl.ai", 443, True, True, None, None, None)
    return cls(key, OSError(111, "Connection refused"))


@pytest.mark.parametrize(("os_error", "message"), [
    (OSError(111, "Connect call failed ('127.0.0.1', 443)"),
     "cannot connect to api.bfl.ai:443: Connection refused"),
    (socket.gaierror(-2, "Name or service not known"),
     "cannot connect to api.bfl.ai:443: Name or service not known"),
])
def test_a_connection_failure_reads_as_one_plain_reason(os_error: OSError, message: str) -> None:
    """Not aiohttp's `Cannot connect to host api.bfl.ai:443 ssl:default [Connect call failed
    ...]`; a name that does not resolve still reads as such, for the proxy hint."""
    key = aiohttp.client_reqrep.ConnectionKey("api.bfl.ai", 443, True, True, None, None, None)
    request = httpx.Request("POST", "https://api.bfl.ai/v1/flux-dev")
    mapped = _classified(aiohttp.ClientConnectorError(key, os_error), request)
    assert (type(mapped), str(mapped)) == (httpx.ConnectError, message)


@pytest.mark.parametrize(("error", "expected", "unsent"), [
    (connector_error(aiohttp.ClientConnectorError), httpx.ConnectError, True),
    (connector_error(aiohttp.ClientConnectorDNSError), httpx.ConnectError, True),
    (connector_error(aiohttp.ClientProxyConnectionError), httpx.ProxyError, True),
    (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout, True),
    (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout, False),
    (aiohttp.ServerTimeoutError("read"), httpx.ReadTimeout, False),
    (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError, False),
    (os_error(aiohttp.ClientOSError), httpx.ReadError, False),
    (aiohttp.ClientPayloadError("short body"), httpx.ReadError, False),
    (aiohttp.ClientError("something new"), httpx.RemoteProtocolError, False),
])
def test_each_aiohttp_failure_maps_to_the_httpx_class_that_says_whether_it_left(
        error: aiohttp.ClientError, expected: type[Exception], unsent: bool) -> None:
    request = httpx.Request("POST", "https://api.bfl.ai/v1/flux-dev")
    # as httpx-aiohttp raises them: its own (wrong for us) class, the cause attached
    wrapped = httpx.ConnectTimeout(str(error), request=request)
    wrapped.__cause__ = error
    for raised in (wrapped, error):
        mapped = _classified(raised, request)
        assert type(mapped) is expected
        assert never_sent(mapped) is unsent


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
        async with Server(handler) as server, wire() as w:
            headers = {**CREDENTIALS, "X-Other": "kept"}
            response = await w.get_following_redirects(get(server.url("/start"), headers))
            assert (response.status_code, response.content) == (200, b"final body")
            assert response.headers["x-final"] == "yes"
            assert response.request.url == server.url("/final")
            assert [(r.method, r.target) for r in server.requests] == [
                ("GET", "/start"), ("GET", "/next?step=2"), ("GET", "/final")]
            for request in server.requests:
                assert {name: request.headers.get(name) for name in CREDENTIAL_NAMES} == (
                    SENT_CREDENTIALS)
                assert request.headers["x-other"] == "kept"

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

            async with Server(handler) as server, wire() as w:
                headers = {**CREDENTIALS, "X-Other": "kept"}
                response = await w.get_following_redirects(get(server.url("/go"), headers))
                assert response.content == b"ok /landed"
                landed = (other if change == "port" else server).requests[-1]
                assert landed.target == "/landed"
                assert not set(CREDENTIAL_NAMES) & set(landed.headers)
                assert landed.headers["x-other"] == "kept"
                first = server.requests[0]  # the first hop still had them
                assert all(name in first.headers for name in CREDENTIAL_NAMES)

    run(main())


def test_credentials_dropped_once_stay_dropped_coming_back() -> None:
    async def main() -> None:
        async with Server(ok) as home, Server(ok) as away, wire() as w:

            async def at_home(request: Received, peer: Peer) -> bool:
                if request.target == "/start":
                    peer.send(redirect(away.url("/away")))
                    return True
                return await ok(request, peer)

            async def bounce(request: Received, peer: Peer) -> bool:
                peer.send(redirect(home.url("/home")))
                return True

            home.handler, away.handler = at_home, bounce
            response = await w.get_following_redirects(get(home.url("/start"), CREDENTIALS))
            assert response.content == b"ok /home"
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
        async with Server(handler) as server, wire() as w:
            request = get(server.url(f"/hop/{hops}"))
            if hops <= MAX_REDIRECTS:
                response = await w.get_following_redirects(request)
                assert (response.status_code, response.content) == (200, b"arrived")
            else:
                with pytest.raises(httpx.TooManyRedirects):
                    await w.get_following_redirects(request)
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
        async with Server(handler) as server, wire() as w:
            response = await w.get_following_redirects(get(server.url("/no-location")))
            assert (response.status_code, response.content) == (302, b"see other")
            with pytest.raises(httpx.RemoteProtocolError, match="Invalid URL in location"):
                await w.get_following_redirects(get(server.url("/bad")))

    run(main())


# -- TLS and proxies ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_trusts_the_ca_bundle_named_by_ssl_cert_file(
        host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))

    async def main() -> None:
        async with Server(ok, server_tls()) as server, wire() as w:
            for path in ("/one", "/two"):
                response = await w.send(get(server.url(path, host)))
                assert (response.status_code, response.content) == (200, b"ok " + path.encode())
            assert server.accepted == 1  # kept alive over TLS as well

    run(main())


def test_https_verification_is_on_by_default() -> None:
    async def main() -> None:
        async with Server(ok, server_tls()) as server, wire() as w:
            with pytest.raises(httpx.ConnectError) as caught:
                await w.send(post(server.url()))
            assert "certificate verify failed" in str(caught.value)
            assert never_sent(caught.value)
            assert not server.requests

    run(main())


def test_http_proxy_from_the_environment_carries_plain_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Proxy() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            port = free_port()  # nothing listens there: only the proxy can answer
            async with wire() as w:
                response = await w.send(get(f"http://127.0.0.1:{port}/v1/get_result?id=1"))
            assert response.content == f"proxied GET http://127.0.0.1:{port}/v1/get_result?id=1".encode()
            assert proxy.seen == [f"GET http://127.0.0.1:{port}/v1/get_result?id=1"]

    run(main())


def test_https_proxy_tunnels_with_connect_and_still_verifies_the_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))

    async def main() -> None:
        async with Server(ok, server_tls()) as server, Proxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            async with wire() as w:
                response = await w.send(post(server.url("/v1/flux-dev", "localhost")))
            assert response.content == b"ok /v1/flux-dev"
            assert proxy.seen == [f"CONNECT localhost:{server.port}"]

    run(main())


def test_no_proxy_sends_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Server(ok) as server, Proxy() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            async with wire() as w:
                assert (await w.send(get(server.url("/direct")))).content == b"ok /direct"
            assert proxy.seen == []

    run(main())


def test_a_netrc_file_adds_no_credentials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's trust_env would add ~/.netrc's password to a request that carries its own
    key (and refuse one with an Authorization header outright)."""
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login user password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))

    async def main() -> None:
        async with Server(ok) as server, wire() as w:
            await w.send(get(server.url("/poll"), {"X-Key": "k"}))
            bearer = httpx.Request("POST", server.url("/submit"), content=b"x",
                                   headers={"Authorization": "Bearer k"})
            assert (await w.send(bearer)).content == b"ok /submit"
            assert [r.headers.get("authorization") for r in server.requests] == [
                None, "Bearer k"]

    run(main())


def test_a_proxy_that_cannot_be_reached_means_nothing_was_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")

    async def main() -> None:
        async with Server(ok) as server, wire() as w:
            with pytest.raises(httpx.TransportError) as caught:
                await w.send(post(server.url()))
            assert never_sent(caught.value), repr(caught.value)
            assert server.requests == []

    run(main())
