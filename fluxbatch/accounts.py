"""A pool of provider accounts: the operator's YAML file (`--accounts FILE`, or the file named
by `FLUXBATCH_ACCOUNTS`) that spreads one render over several accounts, each within its own
caps. It is never a recipe's to name: a recipe may come from a pull request, and the
accounts decide whose money is spent.

    accounts:
      - {name: studio-a, provider: bfl, key_env: BFL_KEY_A, cap: 24}
      - {name: studio-b, provider: bfl, key_env: BFL_KEY_B}

The file names each account's key by the environment variable that holds it (`key_env`, or
`key_file_env` for a variable naming a file that holds it): the key itself is never in the
file, and nothing here ever prints one. The file is read strictly, like a recipe: every
problem located (`accounts.yaml:3:27: accounts[1].cap: ...`), and never a value that could be
a key echoed back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fluxbatch import models, providers, yamlsource
from fluxbatch.declaration import (
    BAD,
    Choice,
    Kind,
    ListOf,
    MapOf,
    Model,
    Reading,
    integer,
    key,
    text,
)
from fluxbatch.errors import ConfigError, Problem, RecipeError
from fluxbatch.jsontypes import JSONObject
from fluxbatch.project import ProjectFileError, read_regular
from fluxbatch.yamlsource import Path

ACCOUNTS_ENV = "FLUXBATCH_ACCOUNTS"  # the operator's accounts file, when --accounts is not given
MAX_ACCOUNTS_BYTES = 1 << 20
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class AccountsError(RecipeError):
    """The accounts file has problems: each one located, none showing a key."""


class _Variable(Kind):
    """The name of an environment variable. A value that is not one is never shown back: it
    may be the key itself, written where its variable's name belongs."""

    types = ("string",)

    def read(self, value: object, path: Path, reading: Reading) -> object:
        if isinstance(value, str) and _VARIABLE.fullmatch(value):
            return value
        reading.fault(path, "must name the environment variable that holds the key (letters, "
                      "digits and _); the key itself never goes in this file")
        return BAD

    def own_schema(self, defs: JSONObject) -> JSONObject:
        return {"type": "string", "pattern": f"^{_VARIABLE.pattern}$"}


@dataclass(frozen=True, slots=True)
class Account:
    """One account of the pool, as the file declares it (its key stays in the environment)."""

    name: str = key(text(pattern=NAME_PATTERN, mismatch=lambda value: (
        f"{value!r} must start with a letter or digit and use only letters, digits, '.', '_' "
        "and '-'")), "The account's name: what the ledger, `status` and `spend` show.",
        required=True, default="")
    provider: str = key(Choice(providers.names), required=True, default="")
    key_env: str | None = key(_Variable(), "The environment variable that holds its key.")
    key_file_env: str | None = key(
        _Variable(), "An environment variable naming a file that holds its key.")
    cap: int | None = key(integer(minimum=1), "Tasks in flight at once (default: -j, the "
                          "recipe's provider.concurrency, else 24).")
    model_caps: Mapping[str, int] = key(
        MapOf(integer(minimum=1)), "Per model, tasks in flight at once (default: the "
        "recipe's model_concurrency, else the catalogue's: flux-kontext-max 6).",
        factory=dict)


@dataclass(frozen=True, slots=True)
class _File:
    accounts: tuple[Account, ...] = key(
        ListOf(Model(Account, closed=True), min_items=1), required=True, default=())


_FILE = Model(_File, closed=True)


def named_file(option: str | None, environ: Mapping[str, str]) -> str | None:
    """The accounts file the operator named: `--accounts`, else `$FLUXBATCH_ACCOUNTS`."""
    return option or environ.get(ACCOUNTS_ENV, "").strip() or None


def load(path: str) -> tuple[Account, ...]:
    """The accounts in the file at `path`, every problem located (`AccountsError`)."""
    where = f"the accounts file {path}"
    try:
        data = read_regular(path, limit=MAX_ACCOUNTS_BYTES, name=where)
    except ProjectFileError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"cannot read {where}: {error.strerror or error}") from None
    try:
        text_ = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    return parse(text_, path)


def parse(source: str, filename: str) -> tuple[Account, ...]:
    try:
        document, positions = yamlsource.load(source, filename)
    except yamlsource.DocumentError as error:
        raise AccountsError(error.problems) from None
    reading = Reading(positions)
    if not isinstance(document, dict):
        reading.fault((), "an accounts file is a mapping with one key, `accounts:`, a list of "
                      "accounts")
        raise AccountsError(reading.problems)
    declared = reading.read(_FILE, document, ())
    problems = list(reading.problems)
    if declared is not BAD:
        problems += _pool_problems(declared.accounts, positions)
    if problems or declared is BAD:
        raise AccountsError(problems)
    accounts: tuple[Account, ...] = declared.accounts
    return accounts


def _pool_problems(accounts: Sequence[Account], positions: yamlsource.Positions
                   ) -> list[Problem]:
    """What the declaration cannot see: names and keys used twice, an account with no key,
    a model cap for a model the catalogue does not know."""
    problems = []
    names: dict[str, int] = {}
    variables: dict[str, str] = {}
    for index, account in enumerate(accounts):
        here: Path = ("accounts", index)
        if account.name in names:
            problems.append(positions.problem((*here, "name"), f"{account.name!r} is the name "
                                              f"of accounts[{names[account.name]}] too"))
        names.setdefault(account.name, index)
        info = providers.REGISTRY[account.provider]
        if account.key_env is None and account.key_file_env is None and \
                info.key_env is not None:
            problems.append(positions.problem(here, "'key_env' is a required key: the "
                                              "environment variable that holds its key"))
        for field in ("key_env", "key_file_env"):
            variable = getattr(account, field)
            if variable is None:
                continue
            other = variables.setdefault(variable, account.name)
            if other != account.name:
                problems.append(positions.problem((*here, field), f"{variable} is the key of "
                                                  f"account {other!r} too: one key is one "
                                                  "account, with one cap"))
        known = models.catalogue()
        for model in account.model_caps:
            if model not in known:
                problems.append(positions.problem(
                    (*here, "model_caps", model), f"unknown model {model!r}"
                    f"{models.did_you_mean(model, list(known))}", key=True))
    return problems


def key_of(account: Account, environ: Mapping[str, str], source: str) -> providers.Secret:
    """The account's key from its variable (or the file its `key_file_env` names); a clear
    error naming the variable to set, before anything is sent."""
    info = providers.REGISTRY[account.provider]
    if account.key_env is None and account.key_file_env is None:
        return providers.Secret(info.name)  # (the emulator: no key needed)
    return providers.key_from(
        environ, account.key_env, account.key_file_env,
        missing=f"account {account.name!r} of {source} needs its key: set "
                f"{account.key_env or account.key_file_env}")


def for_provider(accounts: Sequence[Account], provider: str, source: str) -> list[Account]:
    """The accounts of `provider`, the recipe's: a render spreads over those alone."""
    pool = [account for account in accounts if account.provider == provider]
    if not pool:
        named = sorted({account.provider for account in accounts})
        raise ConfigError(f"{source} names no account of provider {provider!r}, which the "
                          f"recipe uses (it names accounts of {', '.join(named)})")
    return pool


def distinct_keys(pool: Sequence[tuple[Account, providers.Secret]], source: str) -> None:
    """Two accounts whose variables hold the same key are one account: refused (neither the
    key nor its variable's value is shown)."""
    seen: dict[str, str] = {}
    for account, secret in pool:
        other = seen.setdefault(secret.reveal(), account.name)
        if other != account.name:
            raise ConfigError(f"accounts {other!r} and {account.name!r} of {source} hold the "
                              "same key: one key is one account, with one cap")


def describe(path: str) -> str:
    """How messages name the file: `the accounts file accounts.yaml`."""
    return f"the accounts file {os.fspath(path)}"
