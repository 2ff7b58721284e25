"""A pool of accounts (`render --accounts FILE`): the file read strictly, one render spread
over several accounts each within its own caps, every task polled with the key of the account
that paid for it, an account that refuses taken out of the pool, and a task of an account no
longer configured held back. Against the emulator with one account per key."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxbatch import accounts
from fluxbatch.emulator import Account, Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.errors import RecipeError
from fluxbatch.front import load_plan
from fluxbatch.identity import job_key
from fluxbatch.main import main
from fluxbatch.state.shared import Claim, Record, SharedStore
from tests.helpers import Run, build_file_tree, sigkill_when

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"studio-a": "key-aaaa-1111", "studio-b": "key-bbbb-2222", "studio-c": "key-cccc-3333"}
VARIABLES = {"studio-a": "POOL_KEY_A", "studio-b": "POOL_KEY_B", "studio-c": "POOL_KEY_C"}


def recipe_text(items: int, *, kontext: int = 0, prompt: str = "object {{ item }}") -> str:
    values = ", ".join(f"i{n:02d}" for n in range(items))
    edits = ", ".join(f"k{n:02d}" for n in range(kontext))
    second = f"""
  - name: kontext
    prompt: "an edit {{{{ item }}}}"
    params: {{model: flux-kontext-max}}
    matrix:
      item: [{edits}]""" if kontext else ""
    return f"""\
version: 1
name: pool
provider: emulator
output: "{{{{ job }}}}/{{{{ item }}}}.{{{{ ext }}}}"
defaults:
  output_format: png
jobs:
  - name: batch
    prompt: "{prompt}"
    params: {{model: flux-dev, width: 256, height: 256}}
    matrix:
      item: [{values}]{second}
"""


def accounts_text(*names: str, caps: dict[str, int] | None = None,
                  model_caps: str = "") -> str:
    caps = caps or {}
    lines = ["accounts:"]
    for name in names:
        cap = f", cap: {caps[name]}" if name in caps else ""
        lines.append(f"  - {{name: {name}, provider: emulator, key_env: {VARIABLES[name]}"
                     f"{cap}{model_caps}}}")
    return "\n".join(lines) + "\n"


class Pool:
    """A project with the pool recipe and an accounts file, rendered against `emulator`."""

    def __init__(self, root: Path, emulator: Emulator, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.emulator = emulator
        self.capsys = capsys
        for name, variable in VARIABLES.items():
            monkeypatch.setenv(variable, KEYS[name])

    def write(self, recipe: str, accounts_file: str) -> None:
        build_file_tree(self.root, {"recipe.yaml": recipe, "accounts.yaml": accounts_file})

    def __call__(self, *argv: str) -> Run:
        self.capsys.readouterr()
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def render(self, *options: str, accounts_file: str | None = "accounts.yaml") -> Run:
        pool = ("--accounts", str(self.root / accounts_file)) if accounts_file else ()
        return self("render", str(self.root / "recipe.yaml"), "--base-url",
                    self.emulator.base_url, "-q", *pool, *options)

    def ledger(self) -> dict[str, tuple[str, str | None, str | None]]:
        """Per job key: the task's status, its account, and its task id."""
        with sqlite3.connect(self.root / ".fluxbatch" / "state.sqlite") as db:
            return {key: (status, account, task_id) for key, status, account, task_id in
                    db.execute("SELECT key, status, account, task_id FROM tasks")}


def emulator_of(*caps: tuple[str, int], credits: dict[str, float] | None = None,
                latency: float = 0.05, **options: object) -> EmulatorThread:
    credits = credits or {}
    return EmulatorThread(EmulatorConfig(
        latency=latency, latency_sigma=0.1, max_side=64,
        accounts=tuple(Account(KEYS[name], cap=cap, credits=credits.get(name))
                       for name, cap in caps), **options))  # type: ignore[arg-type]


@pytest.fixture
def pool(tmp_path: Path, capsys: pytest.CaptureFixture[str],
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Pool]:
    with emulator_of(("studio-a", 2), ("studio-b", 3), ("studio-c", 4),
                     model_caps={"flux-kontext-max": 1}) as emulator:
        yield Pool(tmp_path / "project", emulator, capsys, monkeypatch)


def owners(emulator: Emulator) -> dict[str, str]:
    """Which account's key submitted each task the emulator holds, by job key."""
    by_key = {key: name for name, key in KEYS.items()}
    return {job_key(str(s["model"]), s["request"]): by_key[str(s["account"])]  # type: ignore
            for s in emulator.submissions}


# -- one render over several accounts ---------------------------------------------------------


def test_a_render_over_three_accounts_keeps_each_within_its_caps_and_polls_with_its_key(
        pool: Pool) -> None:
    pool.write(recipe_text(24, kontext=4),
               accounts_text("studio-a", "studio-b", "studio-c",
                             caps={"studio-a": 2, "studio-b": 3, "studio-c": 4},
                             model_caps=", model_caps: {flux-kontext-max: 1}"))

    result = pool.render()

    assert result.code == 0, result
    assert result.out.startswith("28 written;")
    stats = pool.emulator.stats
    # The emulator refuses any submit over an account's cap, or over its model cap: no 429
    # means none was ever sent over one.
    assert (stats.rejected_429, stats.rejected_auth, stats.foreign_polls) == (0, 0, 0)
    caps = {KEYS["studio-a"]: 2, KEYS["studio-b"]: 3, KEYS["studio-c"]: 4}
    assert set(stats.peak_by_account) == set(caps)
    assert all(stats.peak_by_account[key] <= cap for key, cap in caps.items())
    assert sum(stats.submits_by_account.values()) == 28  # each image paid once
    # The ledger names the account whose key took each task, as the provider saw it.
    ledger = pool.ledger()
    assert {key: account for key, (_, account, _) in ledger.items()} == owners(pool.emulator)
    submitted = Counter(owners(pool.emulator).values())
    assert result.err == ("accounts: " + ", ".join(
        f"{name} {submitted[name]} submitted" for name in KEYS) + "\n")


def test_an_account_that_runs_out_of_credits_leaves_the_pool_and_the_others_render_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # flux-dev costs 2.5 credits: studio-b can pay for two images, then answers 402
    with emulator_of(("studio-a", 3), ("studio-b", 3), ("studio-c", 3),
                     credits={"studio-b": 5.0}) as emulator:
        pool = Pool(tmp_path / "project", emulator, capsys, monkeypatch)
        pool.write(recipe_text(18), accounts_text("studio-a", "studio-b", "studio-c"))

        result = pool.render("--yes")  # (the pool's balance covers it; --yes skips asking)

        paid = Counter(owners(emulator).values())
    assert result.code == 0 and result.out.startswith("18 written;"), result
    assert paid["studio-b"] == 2 and sum(paid.values()) == 18
    out_of_credits = "out of credits (HTTP 402: Insufficient credits)"
    assert result.err == (
        f"fluxbatch: account studio-b: {out_of_credits}; it leaves the pool, and the other "
        f"accounts go on\n"
        f"accounts: studio-a {paid['studio-a']} submitted, studio-b 2 submitted (left the "
        f"pool: {out_of_credits}), studio-c {paid['studio-c']} submitted\n")


def test_when_every_account_refuses_the_run_stops_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with emulator_of(("studio-a", 3), ("studio-b", 3)) as emulator:
        pool = Pool(tmp_path / "project", emulator, capsys, monkeypatch)
        pool.write(recipe_text(6), accounts_text("studio-a", "studio-b"))
        monkeypatch.setenv(VARIABLES["studio-a"], "not-a-key-of-this-provider")
        monkeypatch.setenv(VARIABLES["studio-b"], "nor-this-one")

        result = pool.render("--yes")  # (--yes: no balance is asked first)

        assert emulator.stats.submits == 0
        assert emulator.stats.rejected_auth == 2  # one probe per account, then nothing
    refused = ("the provider refused the API key (HTTP 403: Not authenticated - Invalid "
               "Authentication); check the key in ")
    lines = result.err.splitlines()
    assert result.code == 1
    assert sorted(lines[:2]) == [
        f"fluxbatch: account studio-a: {refused}POOL_KEY_A; it leaves the pool, and the "
        "other accounts go on",
        f"fluxbatch: account studio-b: {refused}POOL_KEY_B; it leaves the pool, and the "
        "other accounts go on"]
    assert lines[2].startswith("fluxbatch: stopped: no account of the pool is left: account ")


def test_sigkill_mid_render_then_a_resume_collects_each_task_with_its_own_account(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with emulator_of(("studio-a", 2), ("studio-b", 2), ("studio-c", 2),
                     latency=1.5) as emulator:
        pool = Pool(tmp_path / "project", emulator, capsys, monkeypatch)
        pool.write(recipe_text(12), accounts_text("studio-a", "studio-b", "studio-c"))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxbatch", "render", str(pool.root / "recipe.yaml"),
             "--base-url", emulator.base_url, "-q", "--accounts",
             str(pool.root / "accounts.yaml")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        # every account has tasks in flight (each cap is 2; tasks take 1.5 s)
        sigkill_when(process, lambda: len({s["account"] for s in emulator.submissions}) == 3
                     and len(emulator.submissions) >= 6)
        left = {key: account for key, (status, account, _) in pool.ledger().items()
                if status == "submitted"}
        assert len(set(left.values())) == 3  # tasks of every account are left in flight

        result = pool.render()

        assert result.code == 0, result
        assert emulator.stats.foreign_polls == 0 and emulator.stats.rejected_auth == 0
        paid = owners(emulator)
    assert len(paid) == 12 and len(emulator.submissions) == 12  # nothing paid twice
    assert {key: paid[key] for key in left} == left
    assert {key: account for key, (_, account, _) in pool.ledger().items()} == paid
    assert len(list((pool.root / "batch").glob("*.png"))) == 12


def test_a_pool_of_a_keyed_provider_needs_only_its_accounts_keys(pool: Pool) -> None:
    """A pool of BFL accounts renders with the keys its accounts file names: the provider's
    own variable (BFL_API_KEY) is not needed, and not read."""
    pool.write(recipe_text(4).replace("provider: emulator", "provider: bfl"),
               accounts_text("studio-a", "studio-b").replace("provider: emulator",
                                                             "provider: bfl"))

    result = pool.render()

    assert (result.code, result.out.startswith("4 written;")) == (0, True), result
    assert set(owners(pool.emulator).values()) == {"studio-a", "studio-b"}
    assert pool.emulator.stats.rejected_auth == 0


# -- a task of an account no longer configured --------------------------------------------------


def test_a_task_of_an_account_no_longer_configured_is_held_back_then_collected_with_its_key(
        pool: Pool) -> None:
    pool.write(recipe_text(4), accounts_text("studio-a", "studio-b"))
    pool.emulator.reconfigure(latency=3.0)
    # `--timeout` leaves each task in flight once its first look finds it still pending
    left = pool.render("--timeout", "0.1")
    assert left.code == 1, left
    pool.emulator.reconfigure(latency=0.05)
    paid = owners(pool.emulator)
    counts = Counter(paid.values())
    in_flight = f"in flight per account: studio-a {counts['studio-a']}, studio-b " \
                f"{counts['studio-b']}\n"
    assert pool("status", str(pool.root / "recipe.yaml")).out.endswith(in_flight)

    build_file_tree(pool.root, {"only-a.yaml": accounts_text("studio-a")})
    held = pool.render(accounts_file="only-a.yaml")

    b = counts["studio-b"]
    images = "image" if b == 1 else "images"
    assert held.code == 1
    assert f"{b} {images} held back: paid earlier through account studio-b, which this " \
        f"render does not use (only its key polls {'its task' if b == 1 else 'their tasks'})" \
        ". Render with an accounts file that names studio-b to collect " \
        f"{'it' if b == 1 else 'them'}, or --force to pay for a new one.\n" in held.err
    # (studio-a's tasks were collected just now; without a pool, the provider's own key
    # polls no account's task)
    without = pool.render(accounts_file=None)
    assert without.code == 1
    assert without.err.startswith(f"{b} {images} held back: paid earlier through account "
                                  "studio-b, which this render does not use")

    collected = pool.render()

    assert collected.code == 0, collected
    assert pool.emulator.stats.foreign_polls == 0
    assert len(pool.emulator.submissions) == 4  # collected, never paid again
    assert {key: account for key, (_, account, _) in pool.ledger().items()} == paid


# -- the accounts file ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problems"), [
    ("accounts:\n  - {name: a, provider: bfl, key_env: BFL_A, cap: 0}\n",
     ["accounts.yaml:2:51: accounts[0].cap: 0 is less than the minimum of 1"]),
    ("accounts:\n  - {name: a, provider: bfl, key_env: BFL_A}\n"
     "  - {name: a, provider: bfl, key_env: BFL_B}\n",
     ["accounts.yaml:3:12: accounts[1].name: 'a' is the name of accounts[0] too"]),
    ("accounts:\n  - {name: a, provider: bfl, key_env: BFL_A}\n"
     "  - {name: b, provider: bfl, key_env: BFL_A}\n",
     ["accounts.yaml:3:39: accounts[1].key_env: BFL_A is the key of account 'a' too: one key "
      "is one account, with one cap"]),
    ("accounts:\n  - {name: a, provider: bfl}\n",
     ["accounts.yaml:2:5: accounts[0]: 'key_env' is a required key: the environment variable "
      "that holds its key"]),
    ("accounts:\n  - {name: a, provider: bfl, key_env: A, model_caps: {flux-kontext-mux: 2}}\n",
     ["accounts.yaml:2:55: accounts[0].model_caps.flux-kontext-mux: unknown model "
      "'flux-kontext-mux' (did you mean 'flux-kontext-max'?)"]),
    ("accounts:\n  - {name: a, provider: bfl, keyenv: A}\n",
     ["accounts.yaml:2:30: accounts[0].keyenv: unknown key 'keyenv' (did you mean "
      "'key_env'?)"]),
    ("accounts: []\n", ["accounts.yaml:1:11: accounts: [] should be non-empty"]),
    ("- a\n", ["accounts.yaml:1:1: an accounts file is a mapping with one key, `accounts:`, a "
               "list of accounts"]),
    ("accounts:\n  - {name: a, provider: bfl, key_env: A\n",
     ["accounts.yaml:3:1: YAML syntax error: expected ',' or '}', but got '<stream end>' "
      "(while parsing a flow mapping at line 2)"]),
])
def test_a_bad_accounts_file_gets_every_problem_located(text: str, problems: list[str]) -> None:
    with pytest.raises(RecipeError) as raised:
        accounts.parse(text, "accounts.yaml")

    assert [str(problem) for problem in raised.value.problems] == problems


SECRET = "bfl_sk-9f8e7d6c5b4a39281706"


@pytest.mark.parametrize("text", [
    f"accounts:\n  - {{name: a, provider: bfl, key_env: {SECRET}}}\n",
    f"accounts:\n  - {{name: a, provider: bfl, key_env: '{SECRET}'}}\n",
    f"accounts:\n  - {{name: a, provider: bfl, key_env: A, key: {SECRET}}}\n",
    f"accounts:\n  - {{name: a, provider: bfl, key_file_env: [{SECRET}]}}\n",
])
def test_a_key_written_into_the_accounts_file_is_never_shown_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    build_file_tree(tmp_path, {"accounts.yaml": text, "recipe.yaml": recipe_text(1).replace(
        "provider: emulator", "provider: bfl")})

    code = main(["render", str(tmp_path / "recipe.yaml"), "--accounts",
                 str(tmp_path / "accounts.yaml")])

    captured = capsys.readouterr()
    assert code == 1
    assert SECRET not in captured.out + captured.err
    assert captured.err.startswith(f"{tmp_path / 'accounts.yaml'}:2:")


def test_the_key_never_reaches_the_ledger_the_manifest_the_logs_or_the_output(
        pool: Pool) -> None:
    pool.write(recipe_text(6), accounts_text("studio-a", "studio-b", "studio-c"))

    result = pool.render("--json")

    assert result.code == 0
    written = b"".join(path.read_bytes() for path in pool.root.rglob("*") if path.is_file())
    shown = (result.out + result.err).encode()
    for key in KEYS.values():
        assert key.encode() not in written + shown


def test_a_missing_key_is_an_error_before_anything_is_sent(pool: Pool,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    pool.write(recipe_text(2), accounts_text("studio-a", "studio-b"))
    monkeypatch.delenv(VARIABLES["studio-b"])

    result = pool.render()

    assert result == Run(1, "", f"fluxbatch: account 'studio-b' of the accounts file "
                                f"{pool.root / 'accounts.yaml'} needs its key: set POOL_KEY_B\n")
    assert pool.emulator.stats.requests == 0


def test_the_accounts_file_may_come_from_the_environment_never_from_a_recipe(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    pool.write(recipe_text(3), accounts_text("studio-b"))
    monkeypatch.setenv("FLUXBATCH_ACCOUNTS", str(pool.root / "accounts.yaml"))

    result = pool.render(accounts_file=None)

    assert result.code == 0, result
    assert set(owners(pool.emulator).values()) == {"studio-b"}
    build_file_tree(pool.root, {"bad.yaml": recipe_text(1) + "accounts: accounts.yaml\n"})
    refused = pool("validate", str(pool.root / "bad.yaml"))
    assert refused.code == 1 and "unknown key 'accounts'" in refused.err


def test_an_accounts_file_of_another_provider_is_refused_by_name(pool: Pool) -> None:
    pool.write(recipe_text(1), "accounts:\n  - {name: a, provider: bfl, key_env: BFL_A}\n")

    result = pool.render()

    assert result == Run(1, "", f"fluxbatch: the accounts file {pool.root / 'accounts.yaml'} "
                                "names no account of provider 'emulator', which the recipe "
                                "uses (it names accounts of bfl)\n")


def test_two_accounts_holding_one_key_are_refused(pool: Pool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pool.write(recipe_text(1), accounts_text("studio-a", "studio-b"))
    monkeypatch.setenv(VARIABLES["studio-b"], KEYS["studio-a"])

    result = pool.render()

    assert result == Run(1, "", f"fluxbatch: accounts 'studio-a' and 'studio-b' of the "
                                f"accounts file {pool.root / 'accounts.yaml'} hold the same "
                                "key: one key is one account, with one cap\n")


def test_a_shard_merged_with_tasks_in_flight_is_collected_with_each_task_s_own_account(
        pool: Pool) -> None:
    """`merge` carries over a shard's tasks in flight with the account that paid for each:
    the merged root polls each with its own key (another account's key would be told "Task
    not found", and the image paid for again)."""
    pool.write(recipe_text(6), accounts_text("studio-a", "studio-b", "studio-c"))
    shard = pool.root / "shard"
    pool.emulator.reconfigure(latency=3.0)
    left = pool.render("--timeout", "0.1", "--out", str(shard))
    assert left.code == 1, left
    pool.emulator.reconfigure(latency=0.05)
    paid = owners(pool.emulator)

    merged = pool("merge", str(pool.root / "recipe.yaml"), str(shard))
    assert merged.code == 0, merged
    collected = pool.render()

    assert collected.code == 0, collected
    assert pool.emulator.stats.foreign_polls == 0
    assert len(pool.emulator.submissions) == 6  # each image paid once
    assert {key: account for key, (_, account, _) in pool.ledger().items()} == paid


def test_a_pool_render_with_a_store_claims_each_key_in_its_own_account_s_name(
        pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a shared store, each claim names the account whose key pays for its task (not
    `FLUXBATCH_ACCOUNT`, and never a key). Another root of the same pool then collects every
    task from those claims with the key of the account that paid for it, whichever of its
    accounts found the claim: nothing is paid twice, nothing polled with another key."""
    store = tmp_path / "shared"
    store.mkdir()
    url = f"file://{store}"
    monkeypatch.setenv("FLUXBATCH_ACCOUNT", "studio-solo")  # (a pool's claims ignore it)
    pool.write(recipe_text(9), accounts_text("studio-a", "studio-b", "studio-c"))
    pool.emulator.reconfigure(latency=3.0)
    left = pool.render("--store", url, "--timeout", "0.1")  # (each task left in flight)
    assert left.code == 1, left
    pool.emulator.reconfigure(latency=0.05)
    paid = owners(pool.emulator)
    assert len(paid) == 9 and len(set(paid.values())) == 3

    shared = SharedStore.open(url)
    claims = {key: shared.lookup(key) for key in paid}
    assert all(isinstance(claim, Claim) and claim.task_id for claim in claims.values())
    assert {key: claim.account for key, claim in claims.items()  # type: ignore[union-attr]
            } == paid
    stored = b"".join(path.read_bytes() for path in store.rglob("*") if path.is_file())
    assert not any(key.encode() in stored for key in KEYS.values())

    other = Pool(tmp_path / "other", pool.emulator, pool.capsys, monkeypatch)
    # (its accounts in another order: the account that finds a claim is not always the one
    # that paid for its task)
    other.write(recipe_text(9), accounts_text("studio-c", "studio-a", "studio-b"))
    collected = other.render("--store", url)

    assert collected.code == 0, collected
    assert len(pool.emulator.submissions) == 9  # each image paid once, by the first root
    assert pool.emulator.stats.foreign_polls == 0
    assert {key: account for key, (_, account, _) in other.ledger().items()} == paid
    records = {key: shared.lookup(key) for key in paid}
    assert {key: record.account for key, record in records.items()  # type: ignore[union-attr]
            } == paid
    assert all(isinstance(record, Record) for record in records.values())
    shared.close()


def test_a_job_another_account_takes_over_is_claimed_again_in_that_account_s_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """studio-a refuses its first submit (out of credits): the job goes to studio-b, and the
    claim on its key, made in studio-a's name before it was sent, is made again in studio-b's,
    which pays. A claim naming studio-a would send another root of the pool to poll the task
    with studio-a's key ("Task not found"), and pay for the image again."""
    store = tmp_path / "shared"
    store.mkdir()
    url = f"file://{store}"
    with emulator_of(("studio-a", 2), ("studio-b", 2), credits={"studio-a": 0.0},
                     latency=3.0) as emulator:
        pool = Pool(tmp_path / "project", emulator, capsys, monkeypatch)
        pool.write(recipe_text(4), accounts_text("studio-a", "studio-b"))
        left = pool.render("--yes", "--store", url, "--timeout", "0.1")
        paid = owners(emulator)
    assert left.code == 1 and "account studio-a: out of credits" in left.err, left
    assert set(paid.values()) == {"studio-b"} and len(paid) == 4
    shared = SharedStore.open(url)
    claims = {key: shared.lookup(key) for key in paid}
    shared.close()
    assert {key: (claim.account, bool(claim.task_id))  # type: ignore[union-attr]
            for key, claim in claims.items()} == {key: ("studio-b", True) for key in paid}


def test_a_pool_holds_back_a_silent_claim_of_another_run_and_says_so_in_one_line(
        pool: Pool, tmp_path: Path) -> None:
    """Another run's claim with no task (its run died while sending: maybe billed) is held
    back by a pool's render as by any, and the report's last line counts it plainly: it is
    no task of this run's accounts."""
    store = tmp_path / "shared"
    store.mkdir()
    url = f"file://{store}"
    pool.write(recipe_text(3), accounts_text("studio-a", "studio-b"))
    key = job_key("flux-dev", load_plan(str(pool.root / "recipe.yaml")).jobs[0].request)
    shared = SharedStore.open(url)
    shared.check()
    assert shared.claim(Claim(key=key, id="c0ffee", provider="emulator", base_url=None,
                              account="studio-a", host="ci-7", root="another-root", run=None,
                              claimed_at=time.time() - 3600)) is None
    shared.close()

    result = pool.render("--store", url)

    assert result.code == 1 and result.out.startswith("2 written, 1 pending;"), result
    assert result.err.endswith(
        "1 task still in flight: run again to collect them (they are not paid for twice).\n")
    assert len(pool.emulator.submissions) == 2


def test_spend_by_account_says_what_each_account_paid(pool: Pool) -> None:
    pool.write(recipe_text(9), accounts_text("studio-a", "studio-b", "studio-c"))
    assert pool.render().code == 0

    result = pool("spend", str(pool.root), "--by", "account", "--json")

    assert result.code == 0, result
    groups = {group["group"]: group["paid"] for group in json.loads(result.out)["groups"]}
    assert groups == dict(Counter(owners(pool.emulator).values()))


def test_the_balance_check_adds_up_the_pool_s_accounts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # flux-dev costs 2.5 credits: 5 images fit in the pool's 12.5 credits, 6 do not
    credits = {"studio-a": 2.5, "studio-b": 5.0, "studio-c": 5.0}
    with emulator_of(("studio-a", 3), ("studio-b", 3), ("studio-c", 3),
                     credits=credits) as emulator:
        pool = Pool(tmp_path / "project", emulator, capsys, monkeypatch)
        pool.write(recipe_text(6), accounts_text("studio-a", "studio-b", "studio-c"))

        refused = pool.render()

        assert emulator.stats.submits == 0
        pool.write(recipe_text(5), accounts_text("studio-a", "studio-b", "studio-c"))
        rendered = pool.render()
    assert refused == Run(1, "", (
        "fluxbatch: the estimated cost $0.15 of the 6 images to render is over the balance of "
        "the pool's 3 accounts, $0.125 in all (studio-a $0.025, studio-b $0.05, studio-c "
        f"$0.05) (emulator at {emulator.base_url}); nothing was sent. Add credits, or pass "
        "--yes to render until the provider refuses\n"))
    assert rendered.code == 0 and rendered.out.startswith("5 written;"), rendered
