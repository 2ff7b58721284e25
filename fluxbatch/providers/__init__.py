"""Providers: how one API host is spoken to. A new provider is one module (a class that
speaks the `Provider` protocol, built as `Class(info, base_url, key)`) and one entry in
`REGISTRY`, whose `speaks` names that class: no other code branches on a provider's name.

A provider only *builds* requests and *reads* responses (plain, synchronous functions); the
executor owns the sending, retrying and waiting. The recipe schema's list of providers
derives from `REGISTRY`, so the two never disagree.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fluxbatch.errors import ConfigError

if TYPE_CHECKING:  # `validate` and `plan` load this module for the registry, and send nothing
    import httpx


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What the planner and the CLI need to know about a provider before talking to it."""

    name: str
    title: str
    # None: the bundled emulator, started in-process for the render (unless --base-url names
    # one already running); a recipe may then name no base_url
    default_base_url: str | None
    key_env: str | None  # environment variable holding the API key; None: no key needed
    key_file_env: str | None  # environment variable naming a file that holds the key
    base_url_env: str | None = None  # environment variable naming another base URL
    # The provider's own hosts, which a recipe's base_url may name (`*` is one label or more).
    hosts: tuple[str, ...] = ()
    # Where else the key may go over https: hosts the provider itself names for polling.
    key_hosts: tuple[str, ...] = ()
    # The class that speaks its API, "module:Class", imported only when one is built (so
    # that `validate` and `plan`, which read the registry, load no HTTP client).
    speaks: str = "fluxbatch.providers.bfl:Bfl"
    # A key that may only read the balance (CometAPI recommends one for its quota query).
    query_key_env: str | None = None

    @property
    def in_process(self) -> bool:
        """Started by the render itself, and gone with it (the bundled emulator)."""
        return self.default_base_url is None


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
    details: object = None


class KeyNotSent(Exception):
    """A request would carry the API key somewhere it may not go; it was not sent."""


class Provider(Protocol):
    info: ProviderInfo
    base_url: str

    def submit_request(self, model: str, body: Mapping[str, object]) -> httpx.Request: ...

    def poll_request(self, submitted: Submitted) -> httpx.Request: ...

    def read_submitted(self, response: httpx.Response) -> Submitted: ...

    def read_polled(self, response: httpx.Response) -> Polled: ...

    def balance_request(self, query_key: Secret | None) -> httpx.Request | None:
        """The request for the account's balance, or None where the provider (at this base
        URL) offers none. It carries a key only to the provider's own origin."""
        ...

    def read_balance(self, response: httpx.Response) -> Balance: ...


@dataclass(frozen=True, slots=True)
class Balance:
    """The account's balance, in USD (and in the provider's credits, where it counts so)."""

    usd: float
    credits: float | None = None


REGISTRY: dict[str, ProviderInfo] = {
    info.name: info
    for info in (
        # BFL's documented API hosts: the global one, the regional ones (api.eu.bfl.ai,
        # api.us.bfl.ai, api.eu1.bfl.ai...) and the original api.bfl.ml; the polling_url of a
        # task may name any cluster under bfl.ai (api.eu4.bfl.ai).
        ProviderInfo("bfl", "Black Forest Labs API", "https://api.bfl.ai", "BFL_API_KEY",
                     "BFL_API_KEY_FILE", "BFL_BASE_URL",
                     hosts=("api.bfl.ai", "api.*.bfl.ai", "api.bfl.ml"),
                     key_hosts=("*.bfl.ai", "api.bfl.ml"),
                     speaks="fluxbatch.providers.bfl:Bfl"),
        ProviderInfo("cometapi", "CometAPI gateway", "https://api.cometapi.com", "COMETAPI_KEY",
                     "COMETAPI_KEY_FILE", "COMETAPI_BASE_URL",
                     hosts=("api.cometapi.com",), key_hosts=("api.cometapi.com",),
                     speaks="fluxbatch.providers.cometapi:CometApi",
                     query_key_env="COMETAPI_QUERY_KEY"),
        # (speaks BFL's API, on loopback)
        ProviderInfo("emulator", "bundled emulator (loopback, no key)", None, None, None,
                     speaks="fluxbatch.providers.bfl:Bfl"),
    )
}
DEFAULT = "bfl"  # the provider of a recipe that names none


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
    return key_from(environ, info.key_env, info.key_file_env, missing=(
        f"provider {info.name!r} needs an API key: set {info.key_env} (or {info.key_file_env} "
        "to a file holding it); the key is never read from the recipe"))


def key_from(environ: Mapping[str, str], key_env: str | None, key_file_env: str | None, *,
             missing: str) -> Secret:
    """The key in `$key_env`, else in the file named by `$key_file_env`; `missing` is the
    error when neither is set. No message ever shows the key."""
    value = environ.get(key_env, "").strip() if key_env else ""
    if value:
        return _usable(value, key_env or "")
    key_file = environ.get(key_file_env, "").strip() if key_file_env else ""
    if key_file:
        try:
            value = Path(key_file).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read the API key file named by {key_file_env} "
                              f"({key_file}): {reason or error}") from None
        if value:
            return _usable(value, f"the file named by {key_file_env} ({key_file})")
        raise ConfigError(f"the API key file named by {key_file_env} ({key_file}) is empty")
    raise ConfigError(missing)


def query_key(info: ProviderInfo, environ: Mapping[str, str]) -> Secret | None:
    """The key that only reads the balance (`COMETAPI_QUERY_KEY`), if one is set."""
    value = environ.get(info.query_key_env, "").strip() if info.query_key_env else ""
    return _usable(value, info.query_key_env or "") if value else None


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
    from `environ` (a provider that needs no key gets its own name as one)."""
    info = REGISTRY[name]
    base_url = base_url or info.default_base_url
    assert base_url is not None, "an in-process provider's base URL comes from the running one"
    if key is None:
        key = Secret(info.name) if info.key_env is None else api_key(info, environ)
    module, _, attribute = info.speaks.partition(":")
    speaker: Callable[..., Provider] = getattr(importlib.import_module(module), attribute)
    provider: Provider = speaker(info, base_url, key)
    return provider


@functools.lru_cache(maxsize=4096)
def parsed_url(url: str) -> httpx.URL:
    """`httpx.URL(url)`, remembered: a task's polling URL is parsed once, not at every poll
    (httpx checks each character, which costs more than building the rest of the request).
    URLs are immutable, so sharing one is safe."""
    import httpx

    return httpx.URL(url)


# -- where the key may go --------------------------------------------------------------------


# The user name and password a URL may carry: after the scheme, up to the last @ before the
# path, the query or the fragment.
_CREDENTIALS = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def credits(value: object) -> float | None:
    """A cost in credits as the provider reported it (just now, or to an earlier run, which
    recorded it): a finite number, not negative; anything else counts as unreported. JSON's
    `1e999` reads as infinity, which no manifest or image can hold, and a negative or NaN
    cost would print as `$-5.00` or `$nan`."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        cost = float(value)
    except OverflowError:  # (an integer of 400 digits)
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


def without_credentials(url: str) -> str:
    """`url` without the user name and password it may carry (`https://user:secret@host/v1`
    → `https://host/v1`): what is recorded in the ledger, or printed, of a URL."""
    return _CREDENTIALS.sub(r"\1", url, count=1)


def check_base_url(url: str, info: ProviderInfo, *, where: str) -> str:
    """`url` as a base URL for `info`, or a ConfigError saying why not. `where` says who named
    it: the operator ("--base-url", an environment variable) may name any https host; a
    recipe only the provider's own hosts or loopback (`recipe_base_url_problem`)."""
    import httpx

    shown = without_credentials(url)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ConfigError(f"{where}: {shown!r} is not a URL ({error})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{where}: base URL {shown!r} must be an http(s) URL with a host")
    if info.key_env is not None and parsed.scheme == "http" and not is_loopback(parsed.host):
        raise ConfigError(f"{where}: {shown} would send the API key unencrypted; use https "
                          "(plain http is allowed only to loopback)")
    return url.rstrip("/")


def recipe_base_url_problem(info: ProviderInfo, url: str) -> str | None:
    """Why a recipe may not name `url` as its base URL, or None. A recipe may come from a
    pull request, so it may not decide where the key goes: only the provider's own hosts
    (https) or loopback."""
    import httpx  # (here, not above: only a recipe that names a base URL needs it)

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        return f"{url!r} is not a URL ({error})"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"base URL {url!r} must be an http(s) URL with a host"
    if is_loopback(parsed.host):
        return None
    if parsed.scheme == "https" and _matches(parsed.host, info.hosts):
        return None
    own = ", ".join(info.hosts) or "none"
    suggested = parsed.copy_with(scheme="https") if parsed.scheme == "http" else parsed
    override = f"--base-url {str(suggested).rstrip('/')} on the command line"
    if info.base_url_env:
        override += f" (or set {info.base_url_env})"
    return (f"a recipe may not send the API key to {parsed.host}: only to {info.name}'s own "
            f"hosts ({own}, over https) or loopback. To use it, pass {override}")


def key_refusal(info: ProviderInfo, base_url: str, url: httpx.URL) -> str | None:
    """Why `url` may not receive the API key, or None: the key goes to the base URL's origin
    and, over https, to the provider's own polling hosts; plain http only to loopback."""
    if info.key_env is None:
        return None  # (no real key: the emulator)
    if url.scheme == "http" and not is_loopback(url.host):
        return f"{url.scheme}://{url.host} is plain http, which would expose the API key"
    if _origin(url) == _origin(parsed_url(base_url)):  # (parsed once, not at every poll)
        return None
    if url.scheme == "https" and _matches(url.host, info.key_hosts):
        return None
    return (f"the provider named {url.scheme}://{url.netloc.decode()} for this task, which is "
            f"not {info.name}'s own host; the API key is not sent there")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _matches(host: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(host.lower(), pattern) for pattern in patterns)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)
