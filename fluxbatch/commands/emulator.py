"""`fluxbatch emulator`: run the bundled BFL/CometAPI emulator in the foreground."""

from __future__ import annotations

import asyncio

from fluxbatch.emulator import Account, Emulator, EmulatorConfig
from fluxbatch.errors import EXIT_INTERRUPTED, EXIT_OK, ConfigError, UsageError


def emulator(
    *,
    host: str,
    port: int,
    latency: float,
    latency_sigma: float,
    cap: int,
    kontext_max_cap: int,
    fault_rate: float,
    seed: int,
    key: str | None,
    url_ttl: float,
    task_ttl: float,
    log: str | None,
    max_side: int,
    shed_rate: float = 0.0,
    credits: float = 1_000_000.0,
    cost: float | None = None,
    report_cost: bool = True,
    keys: tuple[tuple[str, int | None], ...] = (),
) -> int:
    try:
        config = EmulatorConfig(
            host=host,
            port=port,
            latency=latency,
            latency_sigma=latency_sigma,
            cap=cap,
            model_caps={"flux-kontext-max": kontext_max_cap},
            fault_rate=fault_rate,
            shed_rate=shed_rate,
            seed=seed,
            key=key,
            accounts=tuple(Account(each, cap=each_cap) for each, each_cap in keys),
            url_ttl=url_ttl,
            task_ttl=task_ttl,
            log=log,
            max_side=max_side,
            credits=credits,
            cost=cost,
            report_cost=report_cost,
        )
    except ValueError as exc:
        raise UsageError(f"emulator: {exc}") from None
    try:
        asyncio.run(_serve(config))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _serve(config: EmulatorConfig) -> None:
    try:
        await (emu := Emulator(config)).start()
    except OSError as exc:
        raise ConfigError(
            f"emulator: cannot listen on {config.host}:{config.port}: {exc}"
        ) from None
    try:
        accounts = len(config.accounts)
        print(
            f"fluxbatch emulator listening on {emu.base_url}"
            " (BFL routes /v1/..., CometAPI routes /flux/v1/... and /user/quota)"
            + (f"; {accounts} accounts, one per key" if accounts else ""),
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        await emu.stop()
