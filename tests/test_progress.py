"""What the progress display says, fed the executor's events (no terminal, no clock): the
count is of images finished, tasks rendering and downloading are told apart, the cost says
what it is out of, and an 80-column terminal keeps its numbers."""

from __future__ import annotations

import pytest

from fluxbatch.commands.render import _Progress
from fluxbatch.execute import Event
from fluxbatch.expand import Job
from fluxbatch.matrix import Combination
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
