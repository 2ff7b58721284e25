"""A secret request field (webhook_secret) reads `***` wherever fluxbatch shows or records a
request: `plan --json`, the change lines of `status`, the manifest and the provenance inside
each image. An empty secret too: every output agrees, and none tells what a secret holds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fluxbatch import imagemeta, models
from tests.helpers import Cli, check_manifest


@pytest.mark.parametrize("value", ["s3cret", "", None])
def test_redact_masks_a_secret_whatever_its_value_and_keeps_the_rest(value: Any) -> None:
    request = {"prompt": "an owl", "webhook_url": "https://example.com/hook",
               "webhook_secret": value}
    assert models.redact(request) == {"prompt": "an owl",
                                      "webhook_url": "https://example.com/hook",
                                      "webhook_secret": "***"}
    assert request["webhook_secret"] == value  # (a copy: the request sent keeps its secret)


def test_redact_adds_no_secret_to_a_request_without_one() -> None:
    assert models.redact({"prompt": "an owl"}) == {"prompt": "an owl"}


@pytest.mark.parametrize("secret", ["s3cret", ""])
def test_a_secret_reads_stars_in_the_manifest_the_images_and_the_plan(cli: Cli,
                                                                      secret: str) -> None:
    cli.write(secret=secret)
    assert cli.render().code == 0

    entries = check_manifest(cli)
    assert [entry["request"]["webhook_secret"] for entry in entries.values()] == ["***"] * 4
    for path in entries:
        embedded = imagemeta.extract((cli.root / path).read_bytes())
        assert embedded is not None
        assert embedded["request"]["webhook_secret"] == "***"
    plan = json.loads(cli("plan", str(cli.recipe), "--json").out)
    assert [job["request"]["webhook_secret"] for job in plan["jobs"]] == ["***"] * 4
    if secret:  # nowhere but in the recipe: not in the state store, not in a log
        for path in cli.root.rglob("*"):
            if path.is_file() and path != cli.recipe:
                assert secret.encode() not in path.read_bytes(), path


def changes(cli: Cli) -> list[list[str]]:
    document = json.loads(cli.status("--json").out)
    return [image.get("changes", []) for image in document["not_up_to_date"]]


@pytest.mark.parametrize("secret", ["s3cret", ""])
def test_a_stale_image_does_not_list_its_unchanged_secret_as_a_change(cli: Cli,
                                                                      secret: str) -> None:
    cli.write(secret=secret)
    assert cli.render().code == 0
    cli.write(secret=secret, tolerance=3)

    assert changes(cli) == [["safety_tolerance 2 → 3"]]


def test_a_secret_added_to_a_stale_image_reads_stars_in_its_change_line(rendered: Cli) -> None:
    rendered.write(secret="", tolerance=3)

    assert changes(rendered) == [["safety_tolerance 2 → 3", 'webhook_secret (unset) → "***"']]
