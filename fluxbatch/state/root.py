"""An output root's state as planning reads it, once, without creating anything (for
`plan`, `status`, `gallery`, and `render` before it locks): the ledger and every recipe's
placements, from the store, or from the manifests standing in for a lost one; and the images
`render` would adopt by their provenance."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fluxbatch.state.adopt import Planned, adoptable
from fluxbatch.state.ledger import Task
from fluxbatch.state.manifests import ManifestEntry, read_manifest, read_manifests
from fluxbatch.state.placements import Placement, placement_of
from fluxbatch.state.store import Store, has_store


@dataclass(frozen=True, slots=True)
class RootState:
    """What planning needs from an output root, read once: the ledger, every recipe's
    placements, and which recipe asks."""

    recipe: str
    tasks: Mapping[str, Task]
    placements: Mapping[str, Placement]  # this recipe's, by output
    by_key: Mapping[str, list[Placement]]  # every recipe's, by key

    @classmethod
    def of(cls, recipe: str, tasks: Mapping[str, Task],
           placements: Iterable[Placement]) -> RootState:
        own: dict[str, Placement] = {}
        by_key: dict[str, list[Placement]] = {}
        for placement in placements:
            by_key.setdefault(placement.key, []).append(placement)
            if placement.recipe == recipe:
                own[placement.output] = placement
        return cls(recipe, tasks, own, by_key)

    def with_found(self, root: Path, jobs: Iterable[Planned]) -> RootState:
        """This state plus what `render` adopts (`Store.adopt`): the images at the planned
        paths of jobs not placed for this recipe whose embedded provenance carries the
        planned key. (Only folders that exist are listed, and only files there opened.)"""
        unplaced = [job for job in jobs if job.output not in self.placements]
        found = [placement_of(self.recipe, entry, mtime_ns)
                 for entry, mtime_ns in adoptable(root, unplaced)] if unplaced else []
        if not found:
            return self
        placements, by_key = dict(self.placements), dict(self.by_key)
        for placement in found:
            placements[placement.output] = placement
            by_key[placement.key] = [*by_key.get(placement.key, ()), placement]
        return dataclasses.replace(self, placements=placements, by_key=by_key)


def read_state(root: Path, recipe: str, jobs: Iterable[Planned] = ()) -> RootState:
    """The root's state without creating anything (for `plan`, `status`, `gallery`), as
    `render` would find it: the store, or the manifests standing in for a lost one; and, as
    `render` adopts them, images at the planned paths of the jobs not placed for this recipe
    whose embedded provenance carries the planned key."""
    tasks: Mapping[str, Task] = {}
    if has_store(root):
        with Store.open(root, create=False) as store:
            tasks, placements = store.tasks(), store.placements()
    else:
        placements = [placement_of((document.get("recipe") or {}).get("name") or "", entry)
                      for document in read_manifests(root) for entry in document["images"]]
    return RootState.of(recipe, tasks, placements).with_found(root, jobs)


def read_entries(root: Path, recipe: str, outputs: Iterable[str]) -> dict[str, ManifestEntry]:
    """The manifest entries of some of a recipe's placements, by output, without creating
    anything (to say what changed at a stale output)."""
    wanted = set(outputs)
    if not wanted:
        return {}
    if has_store(root):
        with Store.open(root, create=False) as store:
            return {output: entry for output in wanted
                    if (entry := store.entry(recipe, output)) is not None}
    document = read_manifest(root, recipe) or {"images": []}
    return {entry.get("output", entry["path"]): entry for entry in document["images"]
            if entry.get("output", entry["path"]) in wanted}
