"""Providers: how one API host is spoken to. A new provider is one module and one entry here.

The recipe schema's list of providers derives from `REGISTRY`, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What the planner and the CLI need to know about a provider before talking to it."""

    name: str
    title: str
    default_base_url: str | None  # None: started in-process (the emulator)
    key_env: str | None  # environment variable holding the API key; None: no key needed
    key_file_env: str | None  # environment variable naming a file that holds the key


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
