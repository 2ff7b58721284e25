"""Providers: how one API host is spoken to. A new provider is one module and one entry here.

A provider only *builds* requests and *reads* responses (plain, synchronous functions); the
executor owns the sending, retrying and waiting. The recipe schema's list of providers
derives from `REGISTRY`, so the two never disagree.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from fluxbatch.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What the planner and the CLI need to know about a provider before talking to it."""

    name: str
    title: str
    default_base_url: str | None  # None: started in-process (the emulator)
    key_env: str | None  # environment variable holding the API key; None: no key needed
    key_file_env: str | None  # environment variable naming a file that holds the key


@dataclass(frozen=True, slots=True)
class Submitted:
    """The provider accepted a task: from here on it may be billed."""

    task_id: str
    polling_url: str
    cost: float | None  # credits, when the provider reports them


@dataclass(frozen=True, slots=True)
class Polled:
    """One poll's answer: the raw status plus what a Ready result carries."""

    status: str
    sample: str | None = None
    reported_seed: int | None = None
    progress: float | None = None  # 0..1 when the provider reports it
    details: Any = None


class Provider(Protocol):
    info: ProviderInfo
    base_url: str

    def submit_request(self, model: str, body: Mapping[str, Any]) -> httpx.Request: ...

    def poll_request(self, submitted: Submitted) -> httpx.Request: ...

    def read_submitted(self, response: httpx.Response) -> Submitted: ...

    def read_polled(self, response: httpx.Response) -> Polled: ...


REGISTRY: dict[str, ProviderInfo] = {
    info.name: info
    for info in (
        ProviderInfo("bfl", "Black Forest Labs API", "https://api.bfl.ai", "BFL_API_KEY",
                     "BFL_API_KEY_FILE"),
        ProviderInfo("cometapi", "CometAPI gateway", "https://api.cometapi.com", "COMETAPI_KEY",
                     "COMETAPI_KEY_FILE"),
        ProviderInfo("emulator", "bundled emulator (loopback, no key)", None, None, None),
    )
}


def names() -> list[str]:
    return list(REGISTRY)


class Secret:
    """An API key that never prints itself (not in reprs, logs, tracebacks or manifests)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def api_key(info: ProviderInfo, environ: Mapping[str, str]) -> Secret:
    """The key from `$KEY_ENV`, or from the file named by `$KEY_FILE_ENV`; a clear error,
    naming the variable to set, before anything is sent."""
    assert info.key_env is not None and info.key_file_env is not None
    value = environ.get(info.key_env, "").strip()
    if value:
        return _usable(value, info.key_env)
    key_file = environ.get(info.key_file_env, "").strip()
    if key_file:
        try:
            value = Path(key_file).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read the API key file named by {info.key_file_env} "
                              f"({key_file}): {reason or error}") from None
        if value:
            return _usable(value, f"the file named by {info.key_file_env} ({key_file})")
        raise ConfigError(f"the API key file named by {info.key_file_env} ({key_file}) is empty")
    raise ConfigError(
        f"provider {info.name!r} needs an API key: set {info.key_env} (or {info.key_file_env} "
        "to a file holding it); the key is never read from the recipe"
    )


def _usable(value: str, where: str) -> Secret:
    """The key, if an HTTP header can carry it: printable ASCII, no spaces inside (a key file
    with a second line, say, is refused here, before anything is sent). The message never
    shows the key."""
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(f"the API key in {where} contains spaces, line breaks or characters "
                          "that are not printable ASCII; it should be the key alone")
    return Secret(value)


def build(name: str, *, base_url: str | None, environ: Mapping[str, str],
          key: Secret | None = None) -> Provider:
    """The provider `name`, talking to `base_url` (or its default), with `key` or the key
    from `environ`."""
    from fluxbatch.providers import bfl, cometapi

    info = REGISTRY[name]
    if name == "cometapi":
        return cometapi.CometApi(info, base_url or str(info.default_base_url),
                                 key or api_key(info, environ))
    if name == "bfl":
        return bfl.Bfl(info, base_url or str(info.default_base_url),
                       key or api_key(info, environ))
    assert base_url is not None, "the emulator's base URL comes from the running emulator"
    return bfl.Bfl(info, base_url, key or Secret("emulator"))


@functools.lru_cache(maxsize=4096)
def parsed_url(url: str) -> httpx.URL:
    """`httpx.URL(url)`, remembered: a task's polling URL is parsed once, not at every poll
    (httpx checks each character, which costs more than building the rest of the request).
    URLs are immutable, so sharing one is safe."""
    return httpx.URL(url)


def check_base_url(url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"base URL {url!r} must be an http(s) URL with a host")
    return url.rstrip("/")


def is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")


def environment() -> Mapping[str, str]:
    return os.environ
