"""A recipe is untrusted data; the operator's key is not. End to end, through the CLI: a
recipe cannot choose where the key goes, a refused key or an unreachable host stops the run
with one line after one request, and CI sees plain progress lines and a JSON summary."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fluxbatch import wire
from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.main import main
from fluxbatch.network import base_url_for
from fluxbatch.session import Options
from tests.helpers import build_file_tree

KEY = "sk-operator-key"


def recipe(root: Path, provider: str, count: int = 3) -> Path:
    values = ", ".join(str(n) for n in range(count))
    build_file_tree(root, {"recipe.yaml": f"""
        version: 1
        name: trust
        provider: {provider}
        output: "{{{{ n }}}}.{{{{ ext }}}}"
        defaults: {{model: flux-pro-1.1, width: 256, height: 256, output_format: png}}
        jobs:
          - name: grid
            prompt: "image {{{{ n }}}}"
            matrix: {{n: [{values}]}}
        """})
    return root / "recipe.yaml"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[httpx.Request]]:
    """Every Wire the render opens fails the test if a request reaches it."""
    called: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        called.append(request)
        raise AssertionError(f"a request was sent: {request.method} {request.url}")

    monkeypatch.setattr(wire.Wire, "open",
                        classmethod(lambda cls, *a, **k: cls(httpx.MockTransport(refuse))))
    yield called
    assert called == []


@pytest.mark.parametrize(("provider", "base_url", "column", "message"), [
    ("cometapi", "https://comet.collector.example/v1", 38,
     "a recipe may not send the API key to comet.collector.example: only to cometapi's own "
     "hosts (api.cometapi.com, over https) or loopback. To use it, pass --base-url "
     "https://comet.collector.example/v1 on the command line (or set COMETAPI_BASE_URL)"),
    ("bfl", "http://203.0.113.5:8080", 33,
     "a recipe may not send the API key to 203.0.113.5: only to bfl's own hosts (api.bfl.ai, "
     "api.*.bfl.ai, api.bfl.ml, over https) or loopback. To use it, pass --base-url "
     "https://203.0.113.5:8080 on the command line (or set BFL_BASE_URL)"),
    ("bfl", "https://api.bfl.ai.collector.example", 33,
     "a recipe may not send the API key to api.bfl.ai.collector.example: only to bfl's own "
     "hosts (api.bfl.ai, api.*.bfl.ai, api.bfl.ml, over https) or loopback. To use it, pass "
     "--base-url https://api.bfl.ai.collector.example on the command line (or set "
     "BFL_BASE_URL)"),
    ("bfl", "http://api.bfl.ai", 33,
     "a recipe may not send the API key to api.bfl.ai: only to bfl's own hosts (api.bfl.ai, "
     "api.*.bfl.ai, api.bfl.ml, over https) or loopback. To use it, pass --base-url "
     "https://api.bfl.ai on the command line (or set BFL_BASE_URL)"),
])
def test_a_recipe_cannot_send_the_key_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        no_network: list[httpx.Request], provider: str, base_url: str, column: int,
        message: str) -> None:
    path = recipe(tmp_path, f'{{name: {provider}, base_url: "{base_url}"}}')
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("COMETAPI_KEY", KEY)

    for command in (["validate", str(path)], ["render", str(path)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[0] == f"{path}:3:{column}: provider.base_url: {message}"


def test_the_recipes_own_hosts_and_loopback_pass_validation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for url in ("https://api.eu.bfl.ai", "http://127.0.0.1:8000"):
        path = recipe(tmp_path, f'{{name: bfl, base_url: "{url}"}}')
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_plain_http_from_the_command_line_is_refused_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        no_network: list[httpx.Request]) -> None:
    path = recipe(tmp_path, "bfl")
    monkeypatch.setenv("BFL_API_KEY", KEY)

    code = main(["render", str(path), "--base-url", "http://203.0.113.5:8080", "-q"])

    assert (code, capsys.readouterr().err) == (
        1, "fluxbatch: --base-url: http://203.0.113.5:8080 would send the API key unencrypted; "
        "use https (plain http is allowed only to loopback)\n")


def test_the_operator_names_the_base_url_on_the_command_line_or_in_the_environment(
        tmp_path: Path) -> None:
    path = recipe(tmp_path, '{name: bfl, base_url: "https://api.eu.bfl.ai"}')
    plan = load_plan(str(path))

    assert base_url_for(plan, Options(), {}) == "https://api.eu.bfl.ai"
    env = {"BFL_BASE_URL": "https://gateway.corp.example/bfl/"}
    assert base_url_for(plan, Options(), env) == "https://gateway.corp.example/bfl"
    assert base_url_for(plan, Options(base_url="http://127.0.0.1:9000"), env) == (
        "http://127.0.0.1:9000")
    assert base_url_for(load_plan(str(recipe(tmp_path, "cometapi"))), Options(), env) == (
        "https://api.cometapi.com")  # (BFL_BASE_URL is BFL's)


def test_a_scheme_in_capitals_is_the_same_scheme(tmp_path: Path) -> None:
    """`HTTPS://` was refused in a recipe as not an http(s) URL: schemes ignore case."""
    path = recipe(tmp_path, '{name: bfl, base_url: "HTTPS://api.eu.bfl.ai"}')
    assert base_url_for(load_plan(str(path)), Options(), {}) == "HTTPS://api.eu.bfl.ai"


# -- fail fast ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "line"), [
    ("wrong key", "fluxbatch: stopped: the provider refused the API key (HTTP 403: Not "
     "authenticated - Invalid Authentication); check the key in BFL_API_KEY"),
    ("no credits", "fluxbatch: stopped: out of credits (HTTP 402: Insufficient credits)"),
])
def test_a_refused_account_stops_the_run_after_one_submit_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        fault: str, line: str) -> None:
    path = recipe(tmp_path, "bfl", count=30)
    monkeypatch.setenv("BFL_API_KEY", "wrong" if fault == "wrong key" else KEY)
    config = EmulatorConfig(latency=0.0, key=KEY, credits=0.0 if fault == "no credits" else 1e6)
    with EmulatorThread(config) as emulator:
        # (--yes: past the balance checked before a render, test_money.py tests that)
        code = main(["render", str(path), "--base-url", emulator.base_url, "--yes"])
        requests = emulator.stats.requests

    out, err = capsys.readouterr()
    assert code == 1
    assert err == line + "\n"
    assert out == f"30 skipped; nothing paid; manifest {tmp_path / 'trust.manifest.json'}\n"
    assert requests == 1  # one submit, and nothing else


def test_an_unreachable_host_stops_the_run_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = recipe(tmp_path, "bfl", count=20)
    monkeypatch.setenv("BFL_API_KEY", KEY)
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"

    code = main(["render", str(path), "--base-url", dead])

    out, err = capsys.readouterr()
    assert code == 1
    [stopped] = err.splitlines()
    assert stopped == f"fluxbatch: stopped: cannot reach {dead}: Connection refused"
    assert out.startswith("20 skipped; nothing paid")


# -- what CI sees ----------------------------------------------------------------------------


def test_without_a_terminal_progress_comes_as_plain_lines_and_json_on_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = recipe(tmp_path, "emulator", count=6)
    with EmulatorThread(EmulatorConfig(latency=0.4, latency_sigma=0.01)) as emulator:
        code = main(["render", str(path), "--base-url", emulator.base_url, "--json",
                     "--progress-every", "0.05"])

    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out)
    assert summary["counts"] == {"written": 6, "moderated": 0, "failed": 0, "unknown": 0,
                                 "gone": 0, "pending": 0, "skipped": 0}
    assert (summary["spent_usd"], summary["exit_code"], summary["stopped"]) == (0.24, 0, None)
    assert summary["manifest"] == str(tmp_path / "trust.manifest.json")
    lines = err.splitlines()
    progress = [line for line in lines if line.startswith("fluxbatch: ")]
    assert progress, err  # the tasks take 0.4 s: a line every 0.05 s must have come
    first = progress[0]
    assert re.fullmatch(r"fluxbatch: \d/6 images, done \d, rendering \d, downloading \d, "
                        r"failed 0, spent (not reported|\$0\.\d\d) of ~\$0\.24 \(0m0\ds\)",
                        first), first
    assert lines[-1] == f"6 written; cost $0.24 (reported by the provider); manifest " \
                        f"{tmp_path / 'trust.manifest.json'}"
