"""The Python API: load, plan, render and arender; typed errors; nothing printed; a render
that can be stopped and resumed without paying twice."""

from __future__ import annotations

import asyncio
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import fluxbatch
from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.main import main
from tests.helpers import build_file_tree

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """
    version: 1
    name: api
    provider: emulator
    output: "{{ subject }}-{{ replicate }}.{{ ext }}"
    defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png}
    jobs:
      - name: mugs
        prompt: "a {{ subject }}"
        replicates: 2
        matrix: {subject: [teapot, kettle, mug]}
    """


def recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    build_file_tree(tmp_path, {"recipe.yaml": text})
    return tmp_path / "recipe.yaml"


def never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the network was used: {request.method} {request.url}")


def test_the_public_names_resolve_and_import_fluxbatch_stays_light() -> None:
    for name in fluxbatch.__all__:
        assert getattr(fluxbatch, name) is not None
    with pytest.raises(AttributeError):
        fluxbatch.nothing_such  # noqa: B018
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, fluxbatch; print(sorted(m for m in sys.modules "
         "if m.split('.')[0] in ('jinja2', 'httpx', 'aiohttp', 'yaml', 'jsonschema')))"],
        capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_load_raises_a_recipe_error_whose_problems_are_located(tmp_path: Path) -> None:
    path = recipe(tmp_path, RECIPE.replace("width: 256", "width: 99999"))
    with pytest.raises(fluxbatch.RecipeError) as caught:
        fluxbatch.plan(path)
    (problem,) = caught.value.problems
    assert (Path(problem.file).name, problem.line, problem.column, problem.path) == \
        ("recipe.yaml", 5, 40, "defaults.width")
    assert "99999 is greater than the maximum" in problem.message
    assert isinstance(caught.value, fluxbatch.FluxbatchError)
    with pytest.raises(fluxbatch.RecipeError):
        fluxbatch.load(recipe(tmp_path, "version: 1\nname: x\n"))


@pytest.mark.parametrize("schema_problem", [True, False])
def test_load_reports_what_validate_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str],
                                            schema_problem: bool) -> None:
    """load raised 1 problem of validate's 3 (the schema's), and none at all when the recipe
    had only template and parameter problems."""
    text = RECIPE.replace('prompt: "a {{ subject }}"', 'prompt: "a {{ subjct }}"') \
        .replace("width: 256", "width: 9999")
    if schema_problem:
        text = text.replace("provider: emulator\n", "provider: emulator\n    bogus: 1\n")
    recipe(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fluxbatch.RecipeError) as caught:
        fluxbatch.load("recipe.yaml")
    shift = int(schema_problem)  # (its line comes before the others)
    expected = [
        f"recipe.yaml:{5 + shift}:40: defaults.width: 9999 is greater than the maximum of 1440",
        f"recipe.yaml:{8 + shift}:13: jobs[0].prompt: undefined variable 'subjct' (did you "
        "mean 'subject'?)",
    ]
    if schema_problem:
        expected.insert(0, "recipe.yaml:4:1: bogus: unknown key 'bogus'")
    assert [str(problem) for problem in caught.value.problems] == expected
    assert main(["validate", "recipe.yaml"]) == 1
    assert capsys.readouterr().err.splitlines() == [*expected,
                                                    f"recipe.yaml: {len(expected)} problems"]


def test_plan_lists_each_image_with_its_state_and_action_and_prints_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planned = fluxbatch.plan(recipe(tmp_path), only=["teapot-*"])
    assert [(job.output, job.state, job.action) for job in planned.jobs] == [
        ("teapot-1.png", "new", "submit"), ("teapot-2.png", "new", "submit"),
        ("kettle-1.png", "new", "skip"), ("kettle-2.png", "new", "skip"),
        ("mug-1.png", "new", "skip"), ("mug-2.png", "new", "skip")]
    first = planned.jobs[0]
    assert first.prompt == "a teapot" and first.request["seed"] == first.seed
    assert len(first.key) == 64
    assert planned.counts() == {"new": 6}
    assert planned.estimated_usd == pytest.approx(0.08)
    assert capsys.readouterr() == ("", "")


def test_the_estimate_is_rounded_as_plan_json_says_it(tmp_path: Path) -> None:
    """Ten images at $0.04 summed in floating point make 0.39999999999999997."""
    shutil.copy(ROOT / "examples/quickstart/recipe.yaml", tmp_path / "recipe.yaml")
    assert fluxbatch.plan(tmp_path / "recipe.yaml").estimated_usd == 0.4


def test_render_makes_the_images_and_reports_without_printing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = recipe(tmp_path)
    events: list[str] = []
    with EmulatorThread(EmulatorConfig(latency=0.0)) as emulator:
        report = fluxbatch.render(path, base_url=emulator.base_url,
                                  on_event=lambda event: events.append(event.kind))
        assert report.ok and not report.interrupted
        assert sorted(o.job.output for o in report.outcomes) == [
            "kettle-1.png", "kettle-2.png", "mug-1.png", "mug-2.png", "teapot-1.png",
            "teapot-2.png"]
        assert report.spent_usd() == pytest.approx(0.24)
        assert events.count("written") == 6 and events.count("submitted") == 6
        again = fluxbatch.render(fluxbatch.load(path), base_url=emulator.base_url)
        assert again.ok and again.nothing_to_do and again.selection.up_to_date == 6
        assert emulator.stats.submits == 6
    assert (tmp_path / "api.manifest.json").exists()
    assert capsys.readouterr() == ("", "")
    states = fluxbatch.plan(path).counts()
    assert states == {"up-to-date": 6}


def test_a_missing_key_is_a_config_error_and_nothing_is_sent(tmp_path: Path) -> None:
    path = recipe(tmp_path, RECIPE.replace("provider: emulator", "provider: bfl"))
    with pytest.raises(fluxbatch.ConfigError, match="BFL_API_KEY"):
        fluxbatch.render(path, environ={}, transport=httpx.MockTransport(never_called))


def test_arender_runs_inside_a_loop_and_stopping_it_pays_for_nothing_twice(
        tmp_path: Path) -> None:
    path = recipe(tmp_path)
    with EmulatorThread(EmulatorConfig(latency=0.5)) as emulator:
        async def stopped_early() -> fluxbatch.Report:
            render = asyncio.ensure_future(fluxbatch.arender(
                path, base_url=emulator.base_url, jobs=2))
            while emulator.stats.submits < 2:  # two tasks paid for, then stop at once
                await asyncio.sleep(0.01)
            render.cancel()
            with pytest.raises(asyncio.CancelledError):
                await render
            return await fluxbatch.arender(path, base_url=emulator.base_url)

        report = asyncio.run(stopped_early())
        assert report.ok
        # The two tasks paid before the stop were collected, not submitted again.
        assert emulator.stats.submits == 6
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_the_session_stops_gracefully_and_a_second_run_collects_the_rest(
        tmp_path: Path) -> None:
    from fluxbatch.front import load_plan
    from fluxbatch.session import Options, Render

    path = recipe(tmp_path)
    with EmulatorThread(EmulatorConfig(latency=0.3)) as emulator:
        session = Render(load_plan(path), Options(base_url=emulator.base_url,
                                                           concurrency=2))

        def on_event(event: fluxbatch.Event) -> None:
            if event.kind == "submitted":
                session.stop()  # after the first paid submit: submit nothing new

        session.on_event = on_event
        report = asyncio.run(session.run())
        assert report.interrupted and not report.ok
        paid = emulator.stats.submits
        assert 1 <= paid <= 2
        assert fluxbatch.render(path, base_url=emulator.base_url).ok
        assert emulator.stats.submits == 6


def test_the_api_example_plans_and_renders_the_quickstart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(ROOT / "examples/quickstart/recipe.yaml", tmp_path / "recipe.yaml")
    script = str(ROOT / "examples/api/render_quickstart.py")
    sys_argv = sys.argv
    for _ in range(2):
        sys.argv = [script, str(tmp_path / "recipe.yaml")]
        try:
            with pytest.raises(SystemExit) as exit_:
                runpy.run_path(script, run_name="__main__")
        finally:
            sys.argv = sys_argv
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "quickstart: 10 images, {'new': 10}" in out
    assert out.count("  written ") == 10
    assert "quickstart: 10 images, {'up-to-date': 10}\nok: True; spent nothing" in out


def test_a_stop_handle_stops_a_render_from_another_thread_and_the_report_counts_what_it_paid(
        tmp_path: Path) -> None:
    import threading

    path = recipe(tmp_path)
    stop = fluxbatch.StopHandle()
    with EmulatorThread(EmulatorConfig(latency=0.3)) as emulator:
        def on_event(event: fluxbatch.Event) -> None:
            if event.kind == "submitted" and not stop.stopped:
                # Asked from another thread, as a GUI or a watchdog would; the event loop
                # runs the request once this callback returns, before the next submit.
                asker = threading.Thread(target=stop.stop)
                asker.start()
                asker.join()

        report = fluxbatch.render(path, base_url=emulator.base_url, jobs=1,
                                  on_event=on_event, stop=stop)
        assert report.interrupted and not report.ok
        assert emulator.stats.submits == 1
        paid = [o for o in report.outcomes if o.submitted_at is not None]
        # Paid, and left in flight for the next render to collect without paying again.
        assert len(paid) == 1 and paid[0].status == "pending"
        assert report.spent_usd() == paid[0].submitted.cost / 100  # type: ignore[union-attr]
        assert report.spent_usd() is not None
        assert fluxbatch.render(path, base_url=emulator.base_url).ok
        assert emulator.stats.submits == 6


def test_a_stop_handle_asked_before_the_render_starts_sends_nothing(tmp_path: Path) -> None:
    stop = fluxbatch.StopHandle()
    stop.stop(now=True)
    report = fluxbatch.render(recipe(tmp_path), environ={}, stop=stop,
                              base_url="http://127.0.0.1:9",
                              transport=httpx.MockTransport(never_called))
    assert report.interrupted and not report.outcomes and stop.stopped
