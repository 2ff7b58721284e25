"""What changed at a stale image, field by field: the image placed at an output (its manifest
entry) against the job planned there now. `plan`, `status -v`, `render --dry-run` and the
Python API all say it in these words: `width 512 → 576`, `prompt "…teapot…" → "…kettle…"`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence

from fluxbatch import models
from fluxbatch.inputs import describe as describe_input
from fluxbatch.inputs import input_identity, is_descriptor
from fluxbatch.jobs import Job
from fluxbatch.selection import Classified, ImageState
from fluxbatch.state.manifests import ManifestEntry
from fluxbatch.state.root import read_entries

EntryReader = Callable[[Iterable[str]], Mapping[str, ManifestEntry]]


def stale_changes(classified: Classified, *,
                  read: EntryReader | None = None) -> dict[int, list[str]]:
    """For each stale job (by index), what changed since the image at its output was made:
    what `status`, `plan` and the Python API say of it. `read(outputs)` gives the manifest
    entries of those outputs (default: `read_entries`, from the store or the manifest)."""
    plan = classified.plan
    stale_state = ImageState.STALE
    stale = [job for job, found in zip(plan.jobs, classified.states, strict=True)
             if found == stale_state]
    if not stale:
        return {}
    outputs = (job.output for job in stale)
    entries = read(outputs) if read is not None else \
        read_entries(plan.recipe.output_root, plan.recipe.name, outputs)
    return {job.index: changes(entries[job.output], job) for job in stale
            if job.output in entries}


def changes_text(found: Sequence[str]) -> str:
    """What changed at a stale image, as one line (`status -v`, `plan`, `render --dry-run`)."""
    return "the request changed: " + "; ".join(found)


def changes(entry: ManifestEntry, job: Job) -> list[str]:
    """What changed between the image placed at an output (its manifest entry) and the job
    planned there, field by field: `width 512 → 576`, `prompt "…teapot…" → "…kettle…"`."""
    found = []
    if entry.get("model") != job.model:
        found.append(f"model {entry.get('model')} → {job.model}")
    before = entry.get("request") or {}
    after = models.redact(job.request)  # as the entry recorded it
    for name in sorted(set(before) | set(after), key=_field_order):
        old, new = before.get(name, _ABSENT), after.get(name, _ABSENT)
        if models.is_image_field(name) and input_identity(old) == input_identity(new):
            continue  # the same content under another name: not what makes it stale
        if old != new:
            found.append(f"{name} {_shown(old, new)}")
    return found


_ABSENT = object()


def _field_order(name: str) -> tuple[int, str]:
    return (0 if name == "prompt" else 2 if name == "seed" else 1, name)


def _shown(old: object, new: object) -> str:
    if is_descriptor(old) or is_descriptor(new):  # an image input: its name and content
        def image(value: object) -> str:
            return "(unset)" if value is _ABSENT else describe_input(value)
        return f"{image(old)} → {image(new)}"
    if isinstance(old, str) and isinstance(new, str):
        a, b = _around_difference(old, new)
        return f"{a} → {b}"
    def text(value: object) -> str:
        return "(unset)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)
    return f"{text(old)} → {text(new)}"


def _around_difference(old: str, new: str, context: int = 12) -> tuple[str, str]:
    """The two strings shortened to where they differ, with a little context."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end = 0
    while end < min(len(old), len(new)) - start and old[-1 - end] == new[-1 - end]:
        end += 1
    lead = max(0, start - context)

    def cut(text: str) -> str:
        middle = text[lead:len(text) - max(0, end - context)]
        shown = ("…" if lead else "") + middle[:80] + ("…" if len(middle) > 80 else "")
        return json.dumps(shown + ("…" if end > context else ""), ensure_ascii=False)

    return cut(old), cut(new)
