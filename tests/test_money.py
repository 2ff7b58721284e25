"""Money you can trust: a budget that holds at every submit (against a provider charging
more than the list price, with 24 submits in flight, with moderation refunds, across a kill),
the balance checked before a render, and the spend read back from the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.execute import BUDGET_REACHED, Settings
from fluxbatch.money import Budget
from fluxbatch.state.ledger import Charge, Reservation, TaskStatus
from fluxbatch.state.store import Store
from tests.helpers import Cli, Run, build_file_tree
from tests.test_execute import Harness, VirtualTime, make_job, statuses

SCOPE = "(the budget counts this run and the unfinished runs it continues; raise --budget to go on)"


def recipe(count: int, *, prompt: str = "a teapot, take {{ n }}", name: str = "money") -> str:
    """`count` images of flux-pro-1.1 (listed at $0.04)."""
    return f"""
        version: 1
        name: {name}
        provider: emulator
        output: "teapots/{{{{ n }}}}.png"
        defaults: {{model: flux-pro-1.1, width: 256, height: 256, output_format: png}}
        jobs:
          - name: teapots
            prompt: "{prompt}"
            matrix:
              n: {json.dumps(list(range(1, count + 1)))}
        """


class Project(Cli):
    """A recipe of its own in a tmp dir, rendered by the CLI in-process against `emulator`."""

    def __init__(self, root: Path, emulator: Emulator, capsys: pytest.CaptureFixture[str],
                 text: str) -> None:
        super().__init__(emulator, capsys, root)
        self.name = "money"
        build_file_tree(root, {"recipe.yaml": text})

    def manifest(self) -> str:
        return str(self.root / "money.manifest.json")


def charging(credits: float) -> EmulatorThread:
    """An emulator charging `credits` (of $0.01) an image, whatever the list price."""
    return EmulatorThread(EmulatorConfig(latency=0.02, latency_sigma=0.1, max_side=64,
                                         cost=credits))


def moderating(count: int, which: str, token: str) -> str:
    """`recipe(count)` whose images `which` (a Jinja test on `n`) are moderated."""
    return recipe(count, prompt=f"a teapot{{% if {which} %}} [[{token}]]{{% endif %}}, "
                                "take {{ n }}")


@pytest.fixture
def five_times() -> Iterator[Emulator]:
    """A provider charging 5x the list price: $0.20 an image of flux-pro-1.1 ($0.04)."""
    with charging(20.0) as emulator:
        yield emulator


def charged_usd(emulator: Emulator) -> float:
    return round((1_000_000.0 - emulator.credits) / 100, 6)


# -- the budget, against the emulator -------------------------------------------------------


def test_a_provider_charging_five_times_the_list_price_stops_at_the_budget(
        tmp_path: Path, five_times: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    project = Project(tmp_path, five_times, capsys, recipe(25))

    done = project.render("--budget", "1.00")

    # 25 images at the list price fit in $1.00; at 5x it, 5 do. The first one went alone
    # (reserving $0.04, charged $0.20); the others reserved $0.20 each.
    assert done == Run(1, f"5 written, 20 skipped; cost $1.00 (reported by the provider); "
                          f"manifest {project.manifest()}\n",
                       "fluxbatch: budget reached: spent $1.00 of $1.00; 20 images not "
                       f"rendered {SCOPE}\n")
    assert len(five_times.submissions) == 5
    assert charged_usd(five_times) == 1.00


def test_json_and_the_next_run_say_the_same_and_a_higher_budget_goes_on(
        tmp_path: Path, five_times: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    project = Project(tmp_path, five_times, capsys, recipe(10))

    done = project.render("--budget", "0.60", "--json")
    summary = json.loads(done.out)
    assert (done.code, summary["stopped"], summary["budget"], summary["spent_usd"]) == (
        1, f"budget reached: spent $0.60 of $0.60; 7 images not rendered {SCOPE}",
        {"limit_usd": 0.6, "spent_usd": 0.6, "reached": True, "not_rendered": 7,
         "counts": "this run and the unfinished runs it continues"}, 0.6)

    # The next run continues the same render: what was spent is counted, and the price the
    # provider charged is known, so the estimate is refused before anything is sent.
    again = project.render("--budget", "0.60")
    assert again == Run(1, "", "fluxbatch: the estimated cost $1.40 of the 7 images to render "
                               "is over what is left of the budget: $0.00 of $0.60, after "
                               "$0.60 spent by the unfinished runs this one continues; "
                               "nothing was sent\n")
    assert len(five_times.submissions) == 3

    more = project.render("--budget", "2.00")
    assert more.code == 0, more
    assert len(five_times.submissions) == 10
    assert charged_usd(five_times) == 2.00

    # That run finished the render: the next budget starts from nothing.
    project.recipe.write_text(recipe(11))
    assert project.render("--budget", "0.20").code == 0
    assert charged_usd(five_times) == 2.20


def test_moderated_images_are_refunded_and_free_the_budget(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # $0.08 an image (twice the list price); the first two are moderated, and not billed.
    with charging(8.0) as emulator:
        project = Project(tmp_path, emulator, capsys,
                          moderating(5, "n <= 2", "request-moderated"))

        # One task at a time: each moderation is refunded before the next image reserves.
        done = project.render("--budget", "0.24", "-j", "1", "--json")
        summary = json.loads(done.out)
        assert (summary["counts"]["written"], summary["counts"]["moderated"],
                summary["budget"]["spent_usd"], summary["stopped"]) == (3, 2, 0.24, None)
        assert len(emulator.submissions) == 5
        assert emulator.credits == 1_000_000.0 - 24.0  # the provider refunded the two
        with Store.open(tmp_path) as store:
            assert sorted(row.status for row in store.charges()) == \
                [Charge.CHARGED] * 3 + [Charge.REFUNDED] * 2


def start_render(project: Project, *options: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "fluxbatch", "render", str(project.recipe), "--base-url",
         project.emulator.base_url, "-q", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def test_a_kill_mid_run_loses_no_reservation_the_next_run_counts_what_was_spent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = EmulatorConfig(latency=0.5, latency_sigma=0.0, max_side=64, cost=20.0)
    with EmulatorThread(config) as emulator:
        project = Project(tmp_path, emulator, capsys, recipe(25))
        process = start_render(project, "--budget", "5.00", "-j", "2")
        deadline = time.monotonic() + 120
        while len(emulator.submissions) < 3 and process.poll() is None:
            assert time.monotonic() < deadline, "the render never got going"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "the kill did not land mid-run"

        # The 25 images cost $5.00 at $0.20. The next run counts what the killed one spent
        # (its tasks in flight included, which it collects for free): $4.99 is not enough.
        refused = project.render("--budget", "4.99")
        paid = len(emulator.submissions)
        assert 3 <= paid < 25
        spent, left = paid * 0.20, 25 - paid
        assert refused == Run(1, "", f"fluxbatch: the estimated cost ${left * 0.20:.2f} of the "
                                     f"{left} images to render is over what is left of the "
                                     f"budget: ${4.99 - spent:.2f} of $4.99, after "
                                     f"${spent:.2f} spent by the unfinished runs this one "
                                     "continues; nothing was sent\n")
        assert len(emulator.submissions) == paid

        done = project.render("--budget", "5.00")
        assert done.code == 0, done
        assert (len(emulator.submissions), charged_usd(emulator)) == (25, 5.00)


def test_a_reservation_left_by_a_run_that_died_while_sending_counts_as_spent(
        tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.run_started("run-1", "money", 1.0)
        store.reserve("key-a", Reservation(0.2, 0.04, "flux-pro-1.1", "money", "teapots",
                                           "bfl", "run-1"))
        store.submitting("key-a", "bfl", "https://api.bfl.ai", "run-1")
        store.reserve("key-b", Reservation(0.2, 0.04, "flux-pro-1.1", "money", "teapots",
                                           "bfl", "run-1"))  # (never handed over)
    # Both processes died: the next run, holding the lock, settles what was left.
    with Store.open(tmp_path) as store:
        store.settle_reservations()
        assert [(row.key, row.status) for row in store.charges()] == [
            ("key-a", Charge.UNKNOWN)]
        assert store.unfinished_runs("money") == ["run-1"]
        assert store.spent_by_runs(["run-1"]) == 0.2
        store.ended("key-a", TaskStatus.UNKNOWN, "lost")
        assert store.spent_by_runs(["run-1"]) == 0.2


# -- the budget in the executor (virtual time) --------------------------------------------


def test_with_24_submits_in_flight_the_reported_total_stays_within_the_budget() -> None:
    h = Harness(time=VirtualTime(), budget=Budget(6.00))
    h.api.cost = 20.0  # $0.20 an image, 5x the list price of flux-pro-1.1
    h.api.yield_on_submit = True
    jobs = [make_job(i) for i in range(60)]
    for job in jobs:
        h.api.durations[str(job.request["prompt"])] = 30.0

    outcomes = h.run(jobs)

    reported = sum(20.0 for _ in h.api.posts()) / 100
    assert (reported, len(h.api.posts())) == (6.00, 30)
    assert h.api.peak_active == 24  # as many in flight as the account allows
    assert h.api.peak_posts_before_first_answer == 1  # the first went alone, to calibrate
    assert statuses(outcomes) == ["written"] * 30 + ["skipped"] * 30
    assert {o.reason for o in outcomes[30:]} == {BUDGET_REACHED}
    assert h.journal.reserved[:2] == [(0, 0.04), (1, 0.2)]


def test_a_refused_submit_releases_its_reservation_and_a_lost_answer_counts_as_spent(
        ) -> None:
    import httpx

    h = Harness(budget=Budget(0.12), settings=Settings(account_cap=1))
    h.api.submits["image 1"].append(httpx.Response(422, json={"detail": "bad"}))
    h.api.submits["image 2"].append(httpx.Response(502, text="bad gateway"))

    outcomes = h.run([make_job(i) for i in range(5)])

    # 0 is charged, 1 refused (released), 2 maybe billed (spent), 3 fits; 4 does not.
    assert statuses(outcomes) == ["written", "failed", "unknown", "written", "skipped"]
    assert h.executor is not None and h.executor.budget is not None
    assert round(h.executor.budget.spent, 6) == 0.12


# -- the balance, before a render and on demand ----------------------------------------------


def test_a_render_over_the_balance_is_refused_with_both_numbers_and_yes_overrides(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = EmulatorConfig(latency=0.02, latency_sigma=0.1, max_side=64, credits=50.0)
    with EmulatorThread(config) as emulator:
        project = Project(tmp_path, emulator, capsys, recipe(25))

        assert project.render() == Run(
            1, "", "fluxbatch: the estimated cost $1.00 of the 25 images to render is over the "
                   f"account's balance of $0.50 (emulator at {emulator.base_url}); nothing was "
                   "sent. Add credits, or pass --yes to render until the provider refuses\n")
        assert (emulator.stats.submits, emulator.stats.requests) == (0, 1)

        forced = project.render("--yes")
        assert forced.code == 1
        assert forced.err == "fluxbatch: stopped: out of credits (HTTP 402: Insufficient credits)\n"
        assert emulator.stats.submits == 12  # $0.48 of $0.50: the 13th was refused


def test_a_base_url_without_a_balance_query_never_blocks_a_render(tmp_path: Path) -> None:
    import asyncio

    import httpx

    import fluxbatch

    asked: list[str] = []
    with EmulatorThread(EmulatorConfig(latency=0.0, max_side=64)) as emulator:

        async def forward(request: httpx.Request) -> httpx.Response:
            """The emulator, but with no balance query (a proxy, another gateway)."""
            assert request.url.host == "127.0.0.1"  # (nothing leaves this machine)
            if request.url.path == "/v1/credits":
                asked.append(request.url.path)
                return httpx.Response(404, json={"detail": "Not Found"})
            async with httpx.AsyncClient() as client:
                return await client.send(httpx.Request(
                    request.method, request.url, headers=request.headers,
                    content=request.content))

        build_file_tree(tmp_path, {"recipe.yaml": recipe(2)})
        report = asyncio.run(fluxbatch.arender(
            tmp_path / "recipe.yaml", base_url=emulator.base_url, environ={},
            transport=httpx.MockTransport(forward)))
    assert (report.ok, asked) == (True, ["/v1/credits"])


def test_balance_queries_go_only_to_the_providers_own_origin() -> None:
    from fluxbatch import providers
    from fluxbatch.providers import Secret

    key = Secret("sk-main")
    bfl = providers.build("bfl", base_url="https://api.eu.bfl.ai", environ={}, key=key)
    comet = providers.build("cometapi", base_url="https://api.cometapi.com", environ={},
                            key=key)
    proxied = providers.build("cometapi", base_url="https://proxy.example", environ={},
                              key=key)
    local = providers.build("cometapi", base_url="http://127.0.0.1:8000", environ={}, key=key)

    request = bfl.balance_request(None)
    assert (str(request.url), request.headers["x-key"]) == (
        "https://api.eu.bfl.ai/v1/credits", "sk-main")
    assert str(comet.balance_request(Secret("sk-query")).url) == \
        "https://query.cometapi.com/user/quota?key=sk-query"
    assert proxied.balance_request(None) is None  # (the operator's proxy: no key sent on)
    assert str(local.balance_request(None).url) == "http://127.0.0.1:8000/user/quota?key=sk-main"


COMET_KEY = "sk-comet-secret-0123456789"
QUERY_KEY = "sk-comet-query-only-9876543210"


def comet_recipe(count: int) -> str:
    return recipe(count).replace("provider: emulator", "provider: cometapi")


def test_a_cometapi_quota_url_never_appears_in_any_output_file_or_crash_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMETAPI_KEY", COMET_KEY)
    monkeypatch.setenv("COMETAPI_QUERY_KEY", QUERY_KEY)
    seen: list[str] = []
    config = EmulatorConfig(latency=0.02, latency_sigma=0.1, max_side=64, log=None)
    with EmulatorThread(config) as emulator:
        project = Project(tmp_path, emulator, capsys, comet_recipe(3))
        rendered = project.render("--json")
        assert rendered.code == 0, rendered
        seen += [rendered.out, rendered.err]

        balance = project("credits", str(project.recipe), "--base-url", emulator.base_url)
        assert balance == Run(0, f"cometapi at {emulator.base_url}: $9,999.88\n", "")

        # A query key the provider refuses: one line, and no key in it.
        monkeypatch.setenv("COMETAPI_QUERY_KEY", "sk-refused-query-key")
        emulator.reconfigure(key=COMET_KEY)
        refused = project("credits", "--provider", "cometapi", "--base-url", emulator.base_url)
        assert (refused.code, refused.out) == (1, "")
        assert refused.err.startswith(f"fluxbatch: cometapi at {emulator.base_url} answered "
                                      "the balance query with HTTP 401: Invalid token")
        seen += [refused.out, refused.err]

        # A bug while the quota URL is at hand: the crash log and the line holding the error
        # are scrubbed of the key (here the bug's message holds the whole URL).
        monkeypatch.setenv("COMETAPI_QUERY_KEY", QUERY_KEY)
        emulator.reconfigure(key=None)

        def bug(found: object) -> str:
            raise RuntimeError(f"unexpected: {emulator.base_url}/user/quota?key={QUERY_KEY}")

        monkeypatch.setattr("fluxbatch.commands.credits.usd", bug)
        crashed = project("credits", "--provider", "cometapi", "--base-url", emulator.base_url)
        assert crashed.code == 3
        log = Path(crashed.err.split("The full traceback is in ")[1].split(";")[0])
        seen += [crashed.err, log.read_text()]
        assert "/user/quota?key=***" in seen[-1]
        log.unlink()

    kept = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    for secret in (COMET_KEY, QUERY_KEY, "sk-refused-query-key"):
        assert not any(secret in text for text in seen), secret
        assert not any(secret.encode() in data for data in kept), secret


# -- spend -------------------------------------------------------------------------------------


def test_spend_totals_equal_the_sum_of_the_reported_costs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with charging(7.5) as emulator:
        project = Project(tmp_path, emulator, capsys,
                          moderating(6, "n == 2", "content-moderated"))
        assert project.render().code == 1  # (one moderated)
        project.recipe.write_text(moderating(8, "n == 2", "content-moderated"))
        assert project.render().code == 1
        paid = charged_usd(emulator)

        report = json.loads(project("spend", str(tmp_path), "--json").out)
        by_run = json.loads(project("spend", str(tmp_path), "--by", "run", "--json").out)
        csv_rows = project("spend", str(project.recipe), "--csv").out.splitlines()
        table = project("spend", str(tmp_path), "--by", "model")

    # 7 images billed at $0.075, and one moderated (refunded, and not retried): what the
    # provider kept.
    assert report["total_usd"] == paid == 0.525
    assert report["total"] == {"group": "total", "paid": 8, "estimate_usd": 0.32,
                               "reported_usd": 0.525, "not_reported": 0, "refunded": 1,
                               "refunded_usd": 0.075, "unknown": 0, "spent_usd": 0.525}
    assert [g["paid"] for g in by_run["groups"]] == [6, 2]
    assert round(sum(g["spent_usd"] for g in by_run["groups"]), 6) == paid
    assert csv_rows[0] == ("recipe,paid,estimate_usd,reported_usd,not_reported,refunded,"
                           "refunded_usd,unknown,spent_usd")
    assert csv_rows[1:] == ["money,8,0.32,0.525,0,1,0.075,0,0.525",
                            "total,8,0.32,0.525,0,1,0.075,0,0.525"]
    assert table == Run(0, f"spend in {tmp_path}, by model (from the ledger; 1 credit = $0.01)\n"
                           "MODEL         PAID  ESTIMATE  REPORTED  NO COST    REFUNDED  "
                           "UNKNOWN   SPENT\n"
                           "flux-pro-1.1     8     $0.32    $0.525        0  1 ($0.075)  "
                           "      0  $0.525\n"
                           "total            8     $0.32    $0.525        0  1 ($0.075)  "
                           "      0  $0.525\n", "")
    manifest = json.loads((tmp_path / "money.manifest.json").read_text())
    assert [run["spent_usd"] for run in manifest["totals"]["runs"]] == \
        [g["spent_usd"] for g in by_run["groups"]]


def test_spend_reads_only_the_ledger_and_says_when_there_is_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fluxbatch.main import main

    assert main(["spend", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"fluxbatch: {tmp_path}: no ledger "
                                       "(.fluxbatch/state.sqlite): nothing was rendered into "
                                       "this output root\n")
    assert main(["spend", str(tmp_path), "--since", "May 1"]) == 2
    assert capsys.readouterr().err == ("fluxbatch: --since 'May 1': expected a date, like "
                                       "2026-05-01\n")
