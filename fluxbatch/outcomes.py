"""The vocabularies of a render as it goes: how each job ends (`OutcomeStatus`) and the steps
it passes through before that (`EventKind`); the records of both (`Outcome`, `Event`); and how
a writer says that a job failed (`JobFailed`) or that this machine cannot keep its image
(`LocalFault`).

The executor speaks them, and so does the placing of images a root already holds (`place`);
the composition root, the command line and the Python API read them, and all of these do so
without loading the network half (`execute` imports httpx), hence this module of their own.
The values are a contract: they are in `render --json`, in the events a progress display or
an API caller receives, and (`written`) in every manifest entry.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fluxbatch.providers import Polled, Submitted
from fluxbatch.vocabulary import Vocabulary

if TYPE_CHECKING:
    from fluxbatch.jobs import Job


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
    WAITING = "waiting"  # another run (shared store) is rendering it: this one waits for it
    # An account of the pool refused (its key, or out of credits): it leaves the pool, and
    # the job goes to another account (`detail` says which left, and why)
    ACCOUNT_OUT = "account-out"


@dataclass(frozen=True, slots=True)
class Written:
    """An image placed at its output: `Outcome.written`."""

    path: str  # relative to the output root, with the real extension
    sha256: str  # of the file as written (provenance included)
    size: int  # in bytes
    mtime_ns: int  # the file's modification time, as the state store records it


@dataclass(slots=True)
class Outcome:
    """How one image of a render ended: its `status`, why (`reason`), the task it was paid
    with (`submitted`, and the last poll's answer, `polled`), and where it was placed."""

    job: Job
    status: OutcomeStatus
    reason: str | None = None
    submitted: Submitted | None = None
    polled: Polled | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    written: Written | None = None  # where its image was placed (the first of its outputs)
    from_store: bool = False  # placed from the shared store's image: nothing paid
    account: str | None = None  # the account of the pool whose key it went with, if named


@dataclass(frozen=True, slots=True)
class Event:
    """For progress displays: `kind` is a step of the job (an `EventKind`: submitted,
    attached (a task of an earlier run), ready (rendered; the download starts), rate-limited,
    retry, waiting (for another run's image, through the shared store), account-out) or,
    when it ends, its `OutcomeStatus` (written, moderated, failed, unknown, gone, pending,
    skipped)."""

    kind: EventKind | OutcomeStatus
    job: Job
    detail: str | None = None
    cost: float | None = None
    account: str | None = None  # the account of the pool it went with (`--accounts`)


class JobFailed(Exception):
    """A definite failure of one job (a writer raises it too, when the provider's bytes are
    not a usable image)."""


# Faults that would hit every image, not one: a full disk (or a file-size limit of the
# process), a read-only one, a folder this user may not write (a Docker volume owned by
# another user), a rename that cannot cross to the target's file system. Each image paid
# for meanwhile could not be kept or placed.
_RUN_WIDE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.EXDEV, errno.EFBIG})


class LocalFault(Exception):
    """This machine cannot store a result (a writer raises it: disk full, read-only folder).
    The task stays in flight, so the next run collects it without paying again; when the
    cause would hit every image (`stops_run`), the run stops submitting."""

    def __init__(self, message: str, *, stops_run: bool = False) -> None:
        super().__init__(message)
        self.stops_run = stops_run

    @classmethod
    def from_os_error(cls, what: str, error: OSError) -> LocalFault:
        run_wide = error.errno in _RUN_WIDE
        return cls(f"{what}: {error.strerror or error}", stops_run=run_wide)
