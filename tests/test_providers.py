"""Providers build requests and read responses; faked at the transport with a real client."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxbatch import providers
from fluxbatch.errors import ConfigError
from fluxbatch.providers import Polled, Secret, Submitted, responses

KEY = "sk-test-0123456789"
BFL_POLL = "https://api.eu4.bfl.ai/v1/get_result?id=task-7"
SAMPLE = "https://delivery.eu2.bfl.ai/results/sample.jpeg?se=2026&sig=abc"
AZURE_AUTH = (
    '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
    "<Message>Server failed to authenticate the request.\nRequestId:9f1c\n"
    "Time:Tue, 24 Nov 2026 10:00:00 GMT</Message>"
    "<AuthenticationErrorDetail>Signed expiry time has passed</AuthenticationErrorDetail>"
    "</Error>"
)
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def build(name: str, environ: Mapping[str, str] | None = None,
          base_url: str | None = None) -> providers.Provider:
    key_env = providers.REGISTRY[name].key_env
    env = environ if environ is not None else ({key_env: KEY} if key_env else {})
    return providers.build(name, base_url=base_url, environ=env)


def exchange(provider: providers.Provider, submit_reply: dict[str, Any],
             poll_reply: dict[str, Any]) -> tuple[list[httpx.Request], Submitted, Polled]:
    """Submit and poll once through a real AsyncClient; return what was sent and read."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=submit_reply if request.method == "POST" else poll_reply)

    async def talk() -> tuple[Submitted, Polled]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            submit = await client.send(provider.submit_request(
                "flux-pro-1.1", {"prompt": "a red kite", "seed": 7}))
            submitted = provider.read_submitted(submit)
            polled = provider.read_polled(await client.send(provider.poll_request(submitted)))
            return submitted, polled

    submitted, polled = asyncio.run(talk())
    return sent, submitted, polled


READY = {"id": "task-7", "status": "Ready", "result": {"sample": SAMPLE, "seed": 7}}


# -- BFL and CometAPI on the wire -----------------------------------------------------------


def test_bfl_submits_to_the_model_path_with_x_key_and_polls_the_returned_regional_url() -> None:
    sent, submitted, polled = exchange(
        build("bfl"), {"id": "task-7", "polling_url": BFL_POLL, "cost": 4}, READY)

    submit, poll = sent
    assert (submit.method, str(submit.url)) == ("POST", "https://api.bfl.ai/v1/flux-pro-1.1")
    assert submit.headers["x-key"] == KEY
    assert submit.headers["content-type"] == "application/json"
    assert "authorization" not in submit.headers
    assert json.loads(submit.content) == {"prompt": "a red kite", "seed": 7}
    assert submitted == Submitted("task-7", BFL_POLL, 4.0)
    assert (poll.method, str(poll.url)) == ("GET", BFL_POLL)
    assert poll.headers["x-key"] == KEY
    assert polled == Polled("Ready", SAMPLE, 7, None, None)


def test_bfl_reply_without_polling_url_polls_get_result_on_the_base_url() -> None:
    sent, submitted, _ = exchange(build("bfl", base_url="https://api.eu.bfl.ai/"),
                                  {"id": "task-7"}, READY)

    assert str(sent[0].url) == "https://api.eu.bfl.ai/v1/flux-pro-1.1"
    assert submitted == Submitted("task-7", "https://api.eu.bfl.ai/v1/get_result?id=task-7", None)
    assert str(sent[1].url) == "https://api.eu.bfl.ai/v1/get_result?id=task-7"


def test_cometapi_submits_with_bearer_and_polls_its_own_get_result_not_bfls() -> None:
    sent, submitted, polled = exchange(
        build("cometapi"), {"id": "task-7", "polling_url": BFL_POLL}, READY)

    submit, poll = sent
    assert (submit.method, str(submit.url)) == (
        "POST", "https://api.cometapi.com/flux/v1/flux-pro-1.1")
    assert submit.headers["authorization"] == f"Bearer {KEY}"
    assert "x-key" not in submit.headers
    assert submitted.polling_url == "https://api.cometapi.com/flux/v1/get_result?id=task-7"
    assert (poll.method, str(poll.url)) == (
        "GET", "https://api.cometapi.com/flux/v1/get_result?id=task-7")
    assert poll.headers["authorization"] == f"Bearer {KEY}"
    assert "x-key" not in poll.headers
    assert polled.status == "Ready"


def test_cometapi_polls_by_task_id_for_a_task_attached_from_an_earlier_run() -> None:
    provider = build("cometapi", base_url="https://comet.example.test")
    request = provider.poll_request(Submitted("task 9&x", "https://elsewhere.test/x", None))

    assert str(request.url) == "https://comet.example.test/flux/v1/get_result?id=task+9%26x"


def test_emulator_provider_needs_no_key_and_speaks_bfl() -> None:
    provider = providers.build("emulator", base_url="http://127.0.0.1:8123", environ={})

    request = provider.submit_request("flux-dev", {"prompt": "x"})

    assert str(request.url) == "http://127.0.0.1:8123/v1/flux-dev"
    assert request.headers["x-key"] == "emulator"


# -- the registry ---------------------------------------------------------------------------


class Plain:
    """A provider added by a test: one class, one registry entry."""

    def __init__(self, info: providers.ProviderInfo, base_url: str,
                 key: providers.Secret) -> None:
        self.info, self.base_url, self.key = info, base_url, key


def test_a_provider_is_one_class_and_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    info = providers.ProviderInfo("plain", "a provider added by a test",
                                  "https://api.plain.test", "PLAIN_KEY", "PLAIN_KEY_FILE",
                                  speaks=f"{__name__}:Plain")
    monkeypatch.setitem(providers.REGISTRY, "plain", info)

    built = providers.build("plain", base_url=None, environ={"PLAIN_KEY": KEY})

    assert isinstance(built, Plain)
    assert (built.info, built.base_url, built.key.reveal()) == (
        info, "https://api.plain.test", KEY)
    with pytest.raises(ConfigError, match="set PLAIN_KEY"):
        providers.build("plain", base_url=None, environ={})


def test_every_registered_provider_builds_from_its_entry() -> None:
    for name, info in providers.REGISTRY.items():
        provider = build(name, base_url=None if info.default_base_url else "http://127.0.0.1:9")
        assert provider.info is info
        assert type(provider).__name__ == info.speaks.rpartition(":")[2]
        assert info.in_process == (info.default_base_url is None)


def test_no_module_but_the_registry_names_a_provider() -> None:
    """Adding a provider needs no branch elsewhere: nothing compares a provider's name."""
    package = Path(providers.__file__).resolve().parent.parent
    names = "|".join(providers.REGISTRY)
    compared = re.compile(rf"""[=!]=\s*["']({names})["']|["']({names})["']\s*[=!]=""")
    found = [f"{path.relative_to(package)}:{number}"
             for path in sorted(package.rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if compared.search(line)]
    assert found == []


# -- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variable", "file_variable"), [
    ("bfl", "BFL_API_KEY", "BFL_API_KEY_FILE"),
    ("cometapi", "COMETAPI_KEY", "COMETAPI_KEY_FILE"),
])
def test_missing_key_is_a_config_error_naming_the_variable(
        name: str, variable: str, file_variable: str) -> None:
    with pytest.raises(ConfigError) as raised:
        providers.build(name, base_url=None, environ={variable: "   "})

    assert str(raised.value) == (
        f"provider {name!r} needs an API key: set {variable} (or {file_variable} to a file "
        "holding it); the key is never read from the recipe")


@pytest.mark.parametrize(("name", "file_variable", "header", "value"), [
    ("bfl", "BFL_API_KEY_FILE", "x-key", "sk-from-file"),
    ("cometapi", "COMETAPI_KEY_FILE", "authorization", "Bearer sk-from-file"),
])
def test_key_is_read_from_the_file_named_by_the_file_variable(
        tmp_path: Path, name: str, file_variable: str, header: str, value: str) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text("  sk-from-file\n", encoding="utf-8")

    provider = build(name, {file_variable: str(key_file)})

    assert provider.submit_request("flux-dev", {}).headers[header] == value
    assert provider.poll_request(Submitted("t", BFL_POLL, None)).headers[header] == value


def test_key_file_path_may_start_with_tilde() -> None:
    (Path.home() / "bfl.key").write_text("sk-home\n", encoding="utf-8")

    provider = build("bfl", {"BFL_API_KEY_FILE": "~/bfl.key"})

    assert provider.submit_request("flux-dev", {}).headers["x-key"] == "sk-home"


def test_key_variable_wins_over_the_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-from-file", encoding="utf-8")

    provider = build("bfl", {"BFL_API_KEY": "sk-from-env", "BFL_API_KEY_FILE": str(key_file)})

    assert provider.submit_request("flux-dev", {}).headers["x-key"] == "sk-from-env"


def test_unreadable_or_empty_key_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    empty = tmp_path / "empty.key"
    empty.write_text("\n", encoding="utf-8")

    with pytest.raises(ConfigError) as unreadable:
        build("bfl", {"BFL_API_KEY_FILE": str(missing)})
    with pytest.raises(ConfigError) as blank:
        build("cometapi", {"COMETAPI_KEY_FILE": str(empty)})

    assert str(unreadable.value) == (f"cannot read the API key file named by BFL_API_KEY_FILE "
                                     f"({missing}): No such file or directory")
    assert str(blank.value) == (f"the API key file named by COMETAPI_KEY_FILE ({empty}) "
                                "is empty")


@pytest.mark.parametrize("content", ["sk-first\nsecond line\n", "sk with space", "sk-\x00",
                                     "sk-caf\u00e9"])
def test_a_key_no_header_can_carry_is_refused_before_anything_is_sent_without_showing_it(
        tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(content, encoding="utf-8")

    with pytest.raises(ConfigError) as from_file:
        build("bfl", {"BFL_API_KEY_FILE": str(key_file)})
    with pytest.raises(ConfigError) as from_variable:
        build("cometapi", {"COMETAPI_KEY": content})

    assert str(from_file.value) == (
        f"the API key in the file named by BFL_API_KEY_FILE ({key_file}) contains spaces, line "
        "breaks or characters that are not printable ASCII; it should be the key alone")
    assert str(from_variable.value).startswith("the API key in COMETAPI_KEY contains spaces")
    assert "sk" not in str(from_file.value).replace(str(key_file), "")
    assert "sk" not in str(from_variable.value)


def test_a_key_file_that_is_not_text_is_a_config_error(tmp_path: Path) -> None:
    key_file = tmp_path / "key.bin"
    key_file.write_bytes(b"\xff\xfe\x00k")

    with pytest.raises(ConfigError) as caught:
        build("bfl", {"BFL_API_KEY_FILE": str(key_file)})

    assert str(caught.value) == (f"cannot read the API key file named by BFL_API_KEY_FILE "
                                 f"({key_file}): not UTF-8 text")


def test_secret_never_shows_the_key() -> None:
    secret = Secret(KEY)
    renderings: list[Callable[[], str]] = [
        lambda: repr(secret), lambda: str(secret), lambda: f"{secret}", lambda: format(secret),
        lambda: repr([secret]), lambda: repr({"key": secret}),
    ]

    assert secret.reveal() == KEY
    assert [render() for render in renderings] == ["Secret('***')"] + [
        "Secret('***')"] * 3 + ["[Secret('***')]", "{'key': Secret('***')}"]
    for name in ("bfl", "cometapi"):
        provider = build(name)
        request = provider.submit_request("flux-dev", {"prompt": "x"})
        assert KEY not in repr(vars(provider))
        assert KEY not in repr(request)


def test_default_base_urls_and_base_url_checks() -> None:
    bfl = providers.REGISTRY["bfl"]
    assert build("bfl").base_url == "https://api.bfl.ai"
    assert build("cometapi").base_url == "https://api.cometapi.com"
    assert providers.check_base_url("http://127.0.0.1:8000/", bfl, where="--base-url") == (
        "http://127.0.0.1:8000")
    assert providers.check_base_url("https://gateway.corp.example/bfl", bfl,
                                    where="--base-url") == "https://gateway.corp.example/bfl"
    assert providers.check_base_url("HTTPS://gateway.corp.example", bfl,
                                    where="--base-url") == "HTTPS://gateway.corp.example"
    for url, message in [
        ("ftp://example.com", "--base-url: base URL 'ftp://example.com' must be an http(s) URL "
         "with a host"),
        ("http://203.0.113.5:8080", "--base-url: http://203.0.113.5:8080 would send the API key "
         "unencrypted; use https (plain http is allowed only to loopback)"),
        ("HTTP://203.0.113.5", "--base-url: HTTP://203.0.113.5 would send the API key "
         "unencrypted; use https (plain http is allowed only to loopback)"),
    ]:
        with pytest.raises(ConfigError) as raised:
            providers.check_base_url(url, bfl, where="--base-url")
        assert str(raised.value) == message


@pytest.mark.parametrize(("provider", "url", "allowed"), [
    ("bfl", "https://api.bfl.ai", True),
    ("bfl", "https://api.eu.bfl.ai", True),
    ("bfl", "https://api.us1.bfl.ai/", True),
    ("bfl", "https://api.bfl.ml", True),
    ("bfl", "http://127.0.0.1:8000", True),
    ("bfl", "http://localhost:8000", True),
    ("bfl", "http://[::1]:8000", True),
    ("bfl", "HTTPS://API.BFL.AI", True),  # (schemes and hosts ignore case)
    ("bfl", "HTTP://api.bfl.ai", False),
    ("bfl", "http://api.bfl.ai", False),  # plain http
    ("bfl", "https://api.bfl.ai.collector.example", False),
    ("bfl", "https://delivery.eu2.bfl.ai", False),  # BFL's, but not an API host
    ("bfl", "https://api.cometapi.com", False),
    ("bfl", "http://203.0.113.5:8080", False),
    ("cometapi", "https://api.cometapi.com", True),
    ("cometapi", "https://api.bfl.ai", False),
])
def test_a_recipe_may_name_only_its_providers_own_hosts_or_loopback(
        provider: str, url: str, allowed: bool) -> None:
    problem = providers.recipe_base_url_problem(providers.REGISTRY[provider], url)
    assert (problem is None) is allowed, problem


# -- reading responses ------------------------------------------------------------------------


def _response(status: int, body: object | None = None, text: str | None = None) -> httpx.Response:
    if body is not None:
        return httpx.Response(status, json=body)
    return httpx.Response(status, text=text or "")


@pytest.mark.parametrize(("response", "message"), [
    pytest.param(_response(422, {"detail": [{
        "loc": ["body", "width"], "msg": "Input should be less than or equal to 1440",
        "type": "less_than_equal"}]}),
        "HTTP 422: width: Input should be less than or equal to 1440", id="fastapi-one"),
    pytest.param(_response(422, {"detail": [
        {"loc": ["body", "input_image", 0], "msg": "Invalid base64", "type": "value_error"},
        {"loc": ["query", "id"], "msg": "Field required", "type": "missing"},
        {"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]}),
        "HTTP 422: input_image.0: Invalid base64; query.id: Field required; JSON decode error",
        id="fastapi-several"),
    pytest.param(_response(403, {"detail": "Not authenticated - Invalid Authentication"}),
                 "HTTP 403: Not authenticated - Invalid Authentication", id="detail-string"),
    pytest.param(_response(400, {"detail": "Invalid finetune_id\npassed."}),
                 "HTTP 400: Invalid finetune_id passed.", id="detail-two-lines"),
    pytest.param(_response(401, {"error": {
        "message": "Invalid token (request id: 2026112410)", "type": "comet_api_error",
        "param": "", "code": "invalid_api_key"}}),
        "HTTP 401: Invalid token (request id: 2026112410) (invalid_api_key)", id="comet"),
    pytest.param(_response(503, {"error": {
        "message": "Service Unavailable (request id: 1)", "type": "comet_api_error",
        "param": "", "code": ""}}),
        "HTTP 503: Service Unavailable (request id: 1)", id="comet-empty-code"),
    pytest.param(_response(500, {"error": {"type": "server_error"}}),
                 "HTTP 500: server_error", id="comet-type-only"),
    pytest.param(_response(429, {"error": "rate_limit_exceeded",
                                 "message": "Too many concurrent requests", "retry_after": 5}),
                 "HTTP 429: Too many concurrent requests", id="error-string-and-message"),
    pytest.param(_response(403, {"message": "Forbidden"}), "HTTP 403: Forbidden", id="message"),
    pytest.param(_response(500, "upstream failed"), "HTTP 500: upstream failed",
                 id="json-string"),
    pytest.param(_response(502, text=NGINX_502), "HTTP 502: 502 Bad Gateway (HTML page)",
                 id="html-title"),
    pytest.param(_response(524, text="<!DOCTYPE html><html><head><title>api.cometapi.com | "
                                     "524: A timeout occurred</title></head></html>"),
                 "HTTP 524: api.cometapi.com | 524: A timeout occurred (HTML page)",
                 id="cloudflare"),
    pytest.param(_response(503, text="<html><body><h1>Down for\n maintenance</h1></body></html>"),
                 "HTTP 503: Down for maintenance (HTML page)", id="html-no-title"),
    pytest.param(_response(403, text=AZURE_AUTH),
                 "HTTP 403: AuthenticationFailed: Server failed to authenticate the request. "
                 "RequestId:9f1c Time:Tue, 24 Nov 2026 10:00:00 GMT", id="azure-xml"),
    pytest.param(_response(404, text='<?xml version="1.0" encoding="utf-8"?><Error><Code>'
                                     "BlobNotFound</Code><Message>The specified blob does not "
                                     "exist.</Message></Error>"),
                 "HTTP 404: BlobNotFound: The specified blob does not exist.", id="azure-404"),
    pytest.param(_response(503, text="upstream connect error or disconnect/reset"),
                 "HTTP 503: upstream connect error or disconnect/reset", id="plain-text"),
    pytest.param(_response(500), "HTTP 500: Internal Server Error", id="empty"),
    pytest.param(_response(429), "HTTP 429: Too Many Requests", id="empty-429"),
    pytest.param(_response(599), "HTTP 599", id="empty-unknown-status"),
])
def test_error_message_reads_every_error_shape_into_one_line(
        response: httpx.Response, message: str) -> None:
    assert responses.error_message(response) == message


def test_error_message_shortens_a_long_unstructured_body() -> None:
    message = responses.error_message(_response(500, text="x" * 500))

    assert message == "HTTP 500: " + "x" * 199 + "…"


@pytest.mark.parametrize(("progress", "expected"), [
    (0.25, 0.25), (45, 0.45), (100, 1.0), (0, 0.0), (-1, None), (True, None), ("50%", None),
    (None, None),
])
def test_poll_progress_is_read_as_a_fraction(progress: object, expected: float | None) -> None:
    polled = responses.read_polled(_response(200, {"status": "Pending", "progress": progress}))

    assert polled == Polled("Pending", None, None, expected, None)


def test_poll_answers_carry_status_sample_seed_and_details() -> None:
    moderated = {"status": "Content Moderated", "result": None,
                 "details": {"Moderation Reasons": ["NSFW"]}}
    error = {"status": "Error", "result": {"error": "boom"}}

    assert responses.read_polled(_response(200, READY)) == Polled("Ready", SAMPLE, 7)
    assert responses.read_polled(_response(200, moderated)) == Polled(
        "Content Moderated", details={"Moderation Reasons": ["NSFW"]})
    assert responses.read_polled(_response(200, error)) == Polled(
        "Error", details={"error": "boom"})
    assert responses.read_polled(_response(200, {"status": "Task not found"})) == Polled(
        "Task not found")


@pytest.mark.parametrize(("reply", "message"), [
    (_response(200, text="<html>proxy page</html>"),
     "HTTP 200: the body is not JSON: <html>proxy page</html>"),
    (_response(200, {"result": {}}), 'the poll response has no status: {"result":{}}'),
])
def test_unreadable_poll_answer_is_a_bad_response(reply: httpx.Response, message: str) -> None:
    with pytest.raises(responses.BadResponse) as raised:
        responses.read_polled(reply)

    assert str(raised.value) == message


@pytest.mark.parametrize(("raw", "cost"), [
    ("4", 4.0), ("0", 0.0), ("2.5", 2.5), ("1e999", None), ("-1e999", None), ("-5", None),
    ("NaN", None), ("Infinity", None), ("1" + "0" * 400, None), ('"4"', None), ("null", None),
])
def test_a_cost_is_finite_and_not_negative_or_it_counts_as_unreported(
        raw: str, cost: float | None) -> None:
    """`1e999` reads as infinity, which no manifest or image can hold (every later run died
    embedding it); a negative or NaN cost printed as `$-5.00` or `$nan`."""
    answer = httpx.Response(200, content=f'{{"id": "a", "cost": {raw}}}'.encode())

    submitted = responses.read_submitted(answer, fallback_poll="https://api.bfl.ai/r?id={id}")

    assert submitted.cost == cost
    assert responses.credits(json.loads(raw)) == cost


def test_submit_answer_needs_a_task_id_and_reads_cost_when_numeric() -> None:
    read = responses.read_submitted
    fallback = "https://api.bfl.ai/v1/get_result?id={id}"

    assert read(_response(200, {"id": "a", "cost": 2.5}), fallback_poll=fallback) == Submitted(
        "a", "https://api.bfl.ai/v1/get_result?id=a", 2.5)
    assert read(_response(200, {"id": "a", "polling_url": "", "cost": True}),
                fallback_poll=fallback).cost is None
    with pytest.raises(responses.BadResponse) as raised:
        read(_response(200, {"status": "queued"}), fallback_poll=fallback)
    assert str(raised.value) == 'the submit response has no task id: {"status":"queued"}'
