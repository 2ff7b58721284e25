"""What the progress display says, fed the executor's events (no terminal, no clock): the
count is of images finished, tasks rendering and downloading are told apart, the cost says
what it is out of, and an 80-column terminal keeps its numbers."""

from __future__ import annotations

import asyncio
import io
import re
import sys

import pytest

from fluxbatch.commands.render import _Progress
from fluxbatch.expand import Job
from fluxbatch.matrix import Combination
from fluxbatch.outcomes import Event
from fluxbatch.recipe import Recipe
from fluxbatch.selection import Classified, Selection


def job(index: int) -> Job:
    return Job(index=index, job="mugs", vars={"n": index}, replicate=1, model="flux-pro-1.1",
               request={"prompt": f"mug {index}", "seed": index}, seed=index,
               key=f"key-{index}", output=f"{index}.png",
               combination=Combination({"n": index}, "single"))


def progress(count: int) -> tuple[_Progress, list[Job]]:
    jobs = [job(i) for i in range(count)]
    plan = type("Plan", (), {"jobs": tuple(jobs), "recipe": Recipe.__new__(Recipe)})()
    selection = Selection(Classified(plan, ("new",) * count))  # type: ignore[arg-type]
    selection.submit = list(jobs)
    return _Progress(selection, quiet=True, every=0), jobs


def test_tasks_rendering_and_downloading_are_told_apart_and_only_finished_ones_count() -> None:
    shown, jobs = progress(30)
    for each in jobs[:26]:
        shown.event(Event("submitted", each, cost=4.0))
    for each in jobs[:2]:
        shown.event(Event("ready", each))
    shown.event(Event("written", jobs[0]))
    shown.event(Event("failed", jobs[2], "rejected"))
    for each in jobs[26:]:
        shown.event(Event("skipped", each, "interrupted"))

    assert shown.status() == ("done 1, rendering 23, downloading 1, failed 1, "
                              "spent $1.04 of ~$1.20")
    assert shown.finished() == 2  # written and failed: skipped images are never counted


def test_a_cost_the_provider_does_not_report_says_so() -> None:
    shown, jobs = progress(2)
    shown.event(Event("submitted", jobs[0]))
    assert shown.status() == ("done 0, rendering 1, downloading 0, failed 0, spent not reported "
                              "of ~$0.080")


@pytest.mark.parametrize(("columns", "expected"), [
    (160, "done 3, rendering 20, downloading 1, spent $0.96 of ~$1.20"),
    (100, "done 3, rendering 20, downloading 1, spent $0.96"),
    (80, "done 3, rend 20, dl 1, $0.96"),
])
def test_the_bar_text_shortens_to_fit_the_terminal(
        columns: int, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    shown, jobs = progress(30)
    for each in jobs[:24]:
        shown.event(Event("submitted", each, cost=4.0))
    shown.event(Event("ready", jobs[0]))
    for each in jobs[1:4]:
        shown.event(Event("written", each))
    assert shown.fitted() == expected


class _Terminal(io.StringIO):
    """A terminal to draw the bar on: what tqdm writes, `\\r` between redraws."""

    def isatty(self) -> bool:
        return True


def test_the_bar_counts_what_its_text_says_and_stays_where_an_interrupt_stopped_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    jobs = [job(i) for i in range(200)]
    plan = type("Plan", (), {"jobs": tuple(jobs), "recipe": Recipe.__new__(Recipe)})()
    selection = Selection(Classified(plan, ("new",) * 200))  # type: ignore[arg-type]
    selection.submit = list(jobs)
    shown = _Progress(selection, quiet=False, every=5)
    # every update redrawn (tqdm otherwise draws at most every 0.1 s)
    shown.bar.mininterval, shown.bar.miniters, shown.bar.dynamic_miniters = 0, 1, False
    for each in jobs[:40]:
        shown.event(Event("submitted", each, cost=4.0))
    for each in jobs[:12]:
        shown.event(Event("ready", each))
        shown.event(Event("written", each))
    shown.event(Event("failed", jobs[12], "rejected"))

    def last_drawn() -> str:
        return terminal.getvalue().rstrip(" \n").rsplit("\r", 1)[-1]

    assert re.fullmatch(r"  6%\|\S+ *\| 13/200 \[[\d:]+<[\d:?]+\], done 12, rendering 27, "
                        r"failed 1, spent \$1\.60 of ~\$8\.00", last_drawn()), last_drawn()
    # Ctrl-C: the tasks in flight are left pending, the rest skipped; neither is counted
    for each in jobs[13:40]:
        shown.event(Event("pending", each))
    for each in jobs[40:]:
        shown.event(Event("skipped", each, "interrupted"))
    shown.close()
    assert re.fullmatch(r"  6%\|\S+ *\| 13/200 \[[\d:]+<[\d:?]+\], done 12, failed 1, "
                        r"spent \$1\.60 of ~\$8\.00", last_drawn()), last_drawn()


def test_the_bar_is_redrawn_while_no_image_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task takes seconds (minutes at the real API): until the first image is done, the bar
    still shows its clock, what is rendering and what was spent."""
    monkeypatch.setenv("COLUMNS", "160")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    jobs = [job(i) for i in range(10)]
    plan = type("Plan", (), {"jobs": tuple(jobs), "recipe": Recipe.__new__(Recipe)})()
    selection = Selection(Classified(plan, ("new",) * 10))  # type: ignore[arg-type]
    selection.submit = list(jobs)
    shown = _Progress(selection, quiet=False, every=5)
    shown.redraw = 0.01
    for each in jobs[:3]:
        shown.event(Event("submitted", each, cost=4.0))

    async def a_while() -> None:
        ticking = asyncio.ensure_future(shown.tick_every())
        await asyncio.sleep(0.1)
        ticking.cancel()

    asyncio.run(a_while())
    drawn = terminal.getvalue().rstrip(" \n").rsplit("\r", 1)[-1]
    assert re.fullmatch(r"  0%\|\s*\| 0/10 \[[\d:]+<\?\], done 0, rendering 3, spent \$0\.12 "
                        r"of ~\$0\.40", drawn.rstrip()), drawn


@pytest.mark.parametrize("terminal", [True, False], ids=["bar", "lines"])
def test_after_quit_now_the_progress_says_nothing_more(
        monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    """After a second Ctrl-C the bar (or the periodic line of a CI log) kept printing over
    the report: it is cleared, and events and the ticker print nothing more."""
    monkeypatch.setenv("COLUMNS", "160")
    screen = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    jobs = [job(i) for i in range(10)]
    plan = type("Plan", (), {"jobs": tuple(jobs), "recipe": Recipe.__new__(Recipe)})()
    selection = Selection(Classified(plan, ("new",) * 10))  # type: ignore[arg-type]
    selection.submit = list(jobs)
    shown = _Progress(selection, quiet=False, every=0.001)
    shown.event(Event("submitted", jobs[0], cost=4.0))

    shown.silence()
    said = screen.getvalue()
    for each in jobs[1:]:
        shown.event(Event("submitted", each, cost=4.0))
        shown.event(Event("written", each))

    async def a_while() -> None:
        # (with a bar to redraw or lines to print, the ticker would never end: it would
        # time out here)
        await asyncio.wait_for(shown.tick_every(), timeout=60)

    asyncio.run(a_while())
    shown.close()
    assert screen.getvalue() == said
