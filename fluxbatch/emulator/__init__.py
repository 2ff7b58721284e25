"""A loopback HTTP server that speaks BFL's and CometAPI's Flux routes: renders without a key
or a bill (`provider: emulator`), and tests.

`Emulator` runs on the caller's event loop (`async with Emulator(config) as emu`);
`EmulatorThread` runs one on its own loop in a background thread for synchronous callers
(`with EmulatorThread(config) as emu: httpx.post(f"{emu.base_url}/v1/flux-dev", ...)`).
"""

from __future__ import annotations

from fluxbatch.emulator.config import FAULT_KINDS, Account, EmulatorConfig
from fluxbatch.emulator.images import render_image
from fluxbatch.emulator.server import Emulator, EmulatorThread
from fluxbatch.emulator.tasks import Stats, Task

__all__ = [
    "FAULT_KINDS",
    "Account",
    "Emulator",
    "EmulatorConfig",
    "EmulatorThread",
    "Stats",
    "Task",
    "render_image",
]
