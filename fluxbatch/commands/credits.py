"""`fluxbatch credits [RECIPE]`: the account's live balance, asked of the provider's own
balance query (BFL's `GET /v1/credits`; CometAPI's quota query, whose URL carries the key and
so is never printed). The provider and base URL are the recipe's, or `--provider` and
`--base-url`, as `render` would use them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

from fluxbatch import providers
from fluxbatch.errors import EXIT_OK, ConfigError, FluxbatchError, UsageError
from fluxbatch.money import usd


def credits(*, recipe: str | None, provider: str | None, base_url: str | None,
            as_json: bool) -> int:
    from fluxbatch import network

    name, recipe_url, where = provider or providers.DEFAULT, None, "--provider"
    if recipe is not None:
        from fluxbatch import recipe as recipes

        loaded = recipes.load(recipe, strict=False)
        if provider is not None and provider != loaded.provider.name:
            raise UsageError(f"--provider {provider}: the recipe names {loaded.provider.name}")
        name, recipe_url, where = loaded.provider.name, loaded.provider.base_url, recipe
    if name not in providers.REGISTRY:
        raise UsageError(f"--provider {name!r}: choose from {', '.join(providers.names())}")
    environ = os.environ
    url = network.named_base_url(name, recipe_url, where, base_url, environ)
    info = providers.REGISTRY[name]
    query_key = providers.query_key(info, environ)
    # A query-only key is enough to read the balance (CometAPI recommends one).
    key = query_key if query_key is not None and not environ.get(info.key_env or "") else None
    stack = contextlib.ExitStack()
    try:
        speaker = stack.enter_context(network.open_provider(name, url, environ, key=key))
    except ConfigError as error:
        also = f" (or {info.query_key_env}, a key that may only read the balance)" \
            if info.query_key_env else ""
        raise ConfigError(f"{error}{also}") from None
    with stack:
        try:
            found = asyncio.run(network.balance(speaker, environ))
        except network.NoBalance as error:
            raise FluxbatchError(str(error)) from None
        shown = f"{name} at {providers.without_credentials(speaker.base_url)}"
    if as_json:
        print(json.dumps({"provider": name, "base_url": providers.without_credentials(
            speaker.base_url), "usd": found.usd, "credits": found.credits}))
    elif found.credits is not None:
        print(f"{shown}: {found.credits:,.2f} credits ({usd(found.usd)})")
    else:
        print(f"{shown}: {usd(found.usd)}")
    return EXIT_OK
