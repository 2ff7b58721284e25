"""The status vocabularies are string enums whose values are a contract: they appear in
`plan --json`, `status --json`, `render --json`, the manifest, the state store and the API.
Their members must stay equal to, and print as, those very strings."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest

import fluxbatch
from fluxbatch.selection import STATE_ORDER, TO_RENDER
from fluxbatch.state.ledger import TaskStatus
from fluxbatch.vocabulary import Vocabulary

CONTRACT: dict[type[Vocabulary], list[str]] = {
    # in the order `status` lists them
    fluxbatch.ImageState: ["up-to-date", "stored", "new", "missing", "stale", "in-flight",
                           "failed", "moderated", "unknown", "orphaned"],
    fluxbatch.Action: ["submit", "attach", "place", "skip", "hold"],
    fluxbatch.OutcomeStatus: ["written", "moderated", "failed", "unknown", "pending", "skipped",
                              "gone"],
    fluxbatch.EventKind: ["submitted", "attached", "ready", "rate-limited", "retry", "waiting",
                          "account-out"],
    TaskStatus: ["submitting", "submitted", "ready", "fetched", "placed", "moderated", "failed",
                 "unknown", "gone"],
}


@pytest.mark.parametrize("vocabulary", list(CONTRACT), ids=lambda v: v.__name__)
def test_each_vocabulary_keeps_its_strings(vocabulary: type[Vocabulary]) -> None:
    assert [member.value for member in vocabulary] == CONTRACT[vocabulary]
    assert all(member == member.value for member in vocabulary)


def test_the_image_states_order_and_those_render_pays_for() -> None:
    assert [str(state) for state in STATE_ORDER] == CONTRACT[fluxbatch.ImageState]
    assert sorted(TO_RENDER) == ["failed", "missing", "new", "stale"]


def test_a_member_prints_formats_and_serialises_as_its_string() -> None:
    @dataclass
    class Shown:
        state: fluxbatch.ImageState

    new = fluxbatch.ImageState.NEW
    assert (str(new), repr(new), f"{new}", f"{new:>5}", "%s" % (new,)) == (  # noqa: UP031
        "new", "'new'", "new", "  new", "new")
    assert repr(Counter([new, new])) == "Counter({'new': 2})"
    assert repr(Shown(new)) == "test_a_member_prints_formats_and_serialises_as_its_string." \
        "<locals>.Shown(state='new')"
    assert json.dumps({new: [fluxbatch.OutcomeStatus.WRITTEN]}) == '{"new": ["written"]}'
    assert json.dumps({new: 1}, indent=1) == '{\n "new": 1\n}'
    assert {"new": 1}[new] == 1 and Counter([new])["new"] == 1
