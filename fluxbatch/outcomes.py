"""The vocabularies of a render as it goes: how each job ends (`OutcomeStatus`) and the steps
it passes through before that (`EventKind`).

The executor speaks them; the composition root, the command line and the Python API read
them, and do so without loading the network half (`execute` imports httpx), hence this
module of their own. The values are a contract: they are in `render --json`, in the events
a progress display or an API caller receives, and (`written`) in every manifest entry.
"""

from __future__ import annotations

from fluxbatch.vocabulary import Vocabulary


class OutcomeStatus(Vocabulary):
    """How one job of a render ended: `Outcome.status`, and the kind of its last `Event`."""

    WRITTEN = "written"  # its image is placed at every output of its key
    MODERATED = "moderated"
    FAILED = "failed"
    UNKNOWN = "unknown"  # a submit whose outcome was never learned: maybe billed
    PENDING = "pending"  # submitted, result not learned yet (timeout, interrupt): re-attachable
    SKIPPED = "skipped"  # never submitted (interrupted, or the run stopped on a fatal error)
    GONE = "gone"  # paid, but the provider no longer knows the task: only now may it be paid again


class EventKind(Vocabulary):
    """The steps of a job before it ends, as `Event.kind` (when it ends, the kind is its
    `OutcomeStatus`)."""

    SUBMITTED = "submitted"  # the provider accepted it: from here on it may be billed
    ATTACHED = "attached"  # a task of an earlier run, collected without paying again
    READY = "ready"  # rendered; the download starts
    RATE_LIMITED = "rate-limited"  # a 429: the submit waits, then is sent again
    RETRY = "retry"  # a poll or a download failed, and is tried again
