"""Shared fixtures (helpers are in helpers.py). Every test runs away from the real home
directory and real API keys."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from tests import helpers
from tests.helpers import Cli, Run

KEY_VARIABLES = ("BFL_API_KEY", "BFL_API_KEY_FILE", "COMETAPI_KEY", "COMETAPI_KEY_FILE",
                 # the operator's shared store and account name
                 "FLUXBATCH_STORE", "FLUXBATCH_ACCOUNT")


# -- the fast default run and the full one (--slow) ------------------------------------------

# Property tests without a max_examples of their own follow these; those with one ask
# helpers.examples(), which scales it the same way.
settings.register_profile("default", max_examples=20)
settings.register_profile("slow", max_examples=100)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow, and property tests with their "
                          "full number of examples (CI runs them after the default suite)")


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module is imported, so that the decorators evaluated on import see it
    # (each xdist worker runs this with the same options).
    helpers.SLOW = bool(config.getoption("--slow"))
    settings.load_profile("slow" if helpers.SLOW else "default")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two workers per core. About 40% of the summed test time is spent waiting
    (on the emulator's sockets, on child processes), not computing; a second worker per core
    fills it. Measured on a quiet 2-core machine: 3 min 20 s with two workers, 2 min 26 s
    with four. Capped at 8: more only adds the cost of starting workers."""
    return min(8, 2 * (os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                            "https_proxy", "all_proxy", "AWS_", "GOOGLE_", "AZURE_",
                            "FSSPEC_")):
            monkeypatch.delenv(name, raising=False)


# -- an emulator per module, and the rebuild output root (helpers.Cli drives it) ------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    """One emulator per module (tests count submissions from their own start)."""
    with EmulatorThread(EmulatorConfig(latency=0.02, latency_sigma=0.1, max_side=64)) as emu:
        yield emu


@pytest.fixture
def cli(emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    cli = Cli(emulator, capsys, tmp_path / "root")
    cli.write()
    return cli


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("template") / "root"


@pytest.fixture
def rendered(cli: Cli, template: Path) -> Cli:
    """An output root with the recipe's 4 images rendered: rendered once per module, then
    copied with its mtimes (a copy is as up to date as the original)."""
    if not template.exists():
        sent = len(cli.emulator.submissions)
        assert cli.render() == Run(0, cli.written(4), "")
        assert len(cli.emulator.submissions) == sent + 4
        shutil.copytree(cli.root, template)
    else:
        shutil.copytree(template, cli.root, dirs_exist_ok=True)
    return cli
