"""`fluxbatch reproduce --verify IMAGE`: the image rendered again through the normal render
path (paid, after confirmation) into `.verify/` in its output root, and compared pixel by
pixel with the original: identical, drift (a floating model) or differs."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fluxbatch import imagemeta
from fluxbatch.emulator import Emulator, api, images
from tests.helpers import Cli, Run, build_file_tree

RECIPE = """
    version: 1
    name: shots
    provider: emulator
    output: "{{ job }}.png"
    defaults: {width: 256, height: 256, output_format: png}
    jobs:
      - name: pinned
        prompt: "a teapot"
        params: {model: flux-pro-1.1}
        seed: 5
      - name: floating
        prompt: "a kettle"
        params: {model: flux-2-klein-9b-preview}
        seed: 6
    """
DIFFERENCE = r"mean absolute difference \d+\.\d\d of 255, \d+\.\d% of pixels changed"


class Project(Cli):
    def __init__(self, root: Path, emulator: Emulator,
                 capsys: pytest.CaptureFixture[str]) -> None:
        super().__init__(emulator, capsys, root)
        build_file_tree(root, {"recipe.yaml": RECIPE})

    def verify(self, image: str, *options: str) -> Run:
        return self("reproduce", "--verify", str(self.root / image), "--base-url",
                    self.emulator.base_url, *options)

    def sent(self) -> int:
        return len(self.emulator.submissions)


@pytest.fixture
def project(emulator: Emulator, capsys: pytest.CaptureFixture[str],
            tmp_path: Path) -> Project:
    project = Project(tmp_path, emulator, capsys)
    assert project.render().code == 0
    return project


@pytest.fixture
def changed_output(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The provider now makes other pixels for the same request (new weights)."""
    def other(model: str, request: dict[str, Any], max_side: int = 512) -> Any:
        return images.render_image(model, {**request, "prompt": f"{request['prompt']}, v2"},
                                   max_side)

    monkeypatch.setattr(api, "render_image", other)
    yield


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def announced(project: Project, job: str, model: str, seed: int, price: str) -> str:
    return (f"verify: renders {job}.png again with {model} (seed {seed}) into "
            f"{project.root / '.verify'}; this pays for 1 new image, estimated {price}\n")


def test_verify_renders_again_into_a_root_of_its_own_and_finds_it_identical(
        project: Project) -> None:
    original = (project.root / "pinned.png").read_bytes()
    sent = project.sent()

    done = project.verify("pinned.png", "--yes")

    new = project.root / ".verify" / "pinned.png"
    assert done == Run(0, announced(project, "pinned", "flux-pro-1.1", 5, "$0.04")
                       + f"new image: {new} (cost $0.04, reported by the provider)\n"
                       f"identical: the same pixels as {project.root / 'pinned.png'}\n", "")
    assert project.sent() == sent + 1
    assert (project.root / "pinned.png").read_bytes() == original
    assert imagemeta.image_data_digest(new.read_bytes()) == \
        imagemeta.image_data_digest(original)
    assert (project.root / ".verify" / ".gitignore").read_text().endswith("\n*\n")
    spent = project("spend", str(project.root / ".verify"), "--json")
    assert '"total_usd": 0.04' in spent.out
    # rendering again means a new task, on purpose, every time
    assert project.verify("pinned.png", "--yes").code == 0
    assert project.sent() == sent + 2
    assert '"total_usd": 0.08' in project("spend", str(project.root / ".verify"),
                                          "--json").out


def test_a_manifest_entry_is_verified_as_its_image_is(project: Project) -> None:
    done = project("reproduce", "--verify", str(project.root / "shots.manifest.json"),
                   "--entry", "pinned.png", "--yes", "--base-url", project.emulator.base_url)

    assert done.code == 0
    assert done.out.endswith(f"identical: the same pixels as {project.root / 'pinned.png'}\n")


def test_a_floating_model_whose_pixels_changed_is_drift(
        project: Project, changed_output: None) -> None:
    done = project.verify("floating.png", "--yes")

    assert done.code == 0
    assert re.fullmatch(
        re.escape(announced(project, "floating", "flux-2-klein-9b-preview", 6, "$0.015")
                  + f"new image: {project.root / '.verify' / 'floating.png'} (cost $0.015, "
                  "reported by the provider)\n"
                  f"drift (floating model): not the same pixels as "
                  f"{project.root / 'floating.png'} (flux-2-klein-9b-preview is a preview "
                  "model, which the provider may change): ") + DIFFERENCE + "\n", done.out)


def test_a_pinned_model_whose_pixels_changed_differs_and_exits_1(
        project: Project, changed_output: None) -> None:
    done = project.verify("pinned.png", "--yes")

    assert done.code == 1
    last = done.out.splitlines()[-1]
    assert re.fullmatch(re.escape(f"differs: not the same pixels as "
                                  f"{project.root / 'pinned.png'}: ") + DIFFERENCE, last)


def test_without_a_terminal_or_yes_it_says_the_price_and_refuses(project: Project) -> None:
    sent = project.sent()

    done = project.verify("pinned.png")

    assert done == Run(2, announced(project, "pinned", "flux-pro-1.1", 5, "$0.04"),
                       "fluxbatch: reproduce --verify pays for a new image, and there is no "
                       "terminal to confirm it: pass --yes to go ahead; nothing was sent\n")
    assert project.sent() == sent
    assert not (project.root / ".verify" / "pinned.png").exists()


@pytest.mark.parametrize(("answer", "code"), [("y\n", 0), ("\n", 1), ("no\n", 1)])
def test_a_terminal_is_asked_first(project: Project, monkeypatch: pytest.MonkeyPatch,
                                   answer: str, code: int) -> None:
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    sent = project.sent()

    done = project.verify("pinned.png")

    assert done.code == code
    assert done.out.startswith(announced(project, "pinned", "flux-pro-1.1", 5, "$0.04")
                               + "Pay for it and render? [y/N] ")
    assert project.sent() == sent + (1 if code == 0 else 0)
    if code:
        assert done.err == "fluxbatch: not confirmed; nothing was sent\n"


def test_the_budget_is_honoured_before_anything_is_sent(project: Project) -> None:
    sent = project.sent()

    done = project.verify("pinned.png", "--yes", "--budget", "0.01")

    assert done.code == 1
    assert done.err.startswith("fluxbatch: the estimated cost $0.04 of the 1 image to render "
                               "is over the budget of $0.01")
    assert project.sent() == sent


def test_a_paid_verify_whose_image_was_not_written_is_collected_not_paid_again(
        project: Project) -> None:
    blocked = project.root / ".verify" / "pinned.png"
    blocked.mkdir(parents=True)  # (a folder where the image goes: it cannot be written)
    sent = project.sent()

    first = project.verify("pinned.png", "--yes")

    assert first.code == 1
    assert project.sent() == sent + 1
    assert first.err.startswith("fluxbatch: not verified: the new image is ")
    blocked.rmdir()
    again = project.verify("pinned.png", "--yes")

    assert project.sent() == sent + 1  # nothing paid again
    assert again == Run(0, f"new image: {blocked} (rendered and paid for by an earlier "
                           "verify, not paid again)\n"
                           f"identical: the same pixels as {project.root / 'pinned.png'}\n", "")


def test_damaged_provenance_is_a_clear_error_not_a_crash(project: Project) -> None:
    image = project.root / "pinned.png"
    image.write_bytes(imagemeta.embed(image.read_bytes(), {"request": [1], "path": "x"}))

    for command in (("reproduce", str(image)), ("reproduce", "--verify", str(image), "--yes")):
        done = project(*command)
        assert done == Run(1, "", f"fluxbatch: {image}: the provenance it carries is damaged "
                                  "(its request is not an object); it cannot be made again\n")


def test_verify_options_go_with_verify_only(project: Project) -> None:
    image = str(project.root / "pinned.png")

    assert project("reproduce", image, "--yes").err == \
        "fluxbatch: reproduce: --yes, --budget and --base-url go with --verify\n"
    assert project("reproduce", image, "--verify", "-o", "x.yaml").err == \
        "fluxbatch: reproduce --verify writes no recipe: drop -o/--output\n"
