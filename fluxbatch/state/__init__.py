"""The state of an output root (`.fluxbatch/`, named in `fluxbatch.layout`), in pieces:

- `ledger`: what was paid for, by job key (`Ledger`, `Task`, `TaskStatus`);
- `placements`: where images were placed, by recipe and output (`Placements`);
- `blobs`: the downloaded bytes by sha256, checked when read (`BlobStore`);
- `store`: the root's SQLite file holding the ledger and placements (`Store`), and
  `migrations`, its schema; `database`: the connection under it;
- `manifests`: manifests read back, and the shape of an entry;
- `adopt`: images recognised by the provenance embedded in them;
- `root`: the root's state as planning reads it (`RootState`, `read_state`);
- `lock`: one render at a time per root (`RootLock`);
- `files`: atomic writes, and the state directory with its `.gitignore`.

An image is its key: a key whose bytes the root holds (in the content store or in any placed
file) is placed, never paid for again; a key with a task in flight is collected. A lost store
is rebuilt from the manifests, and a lost store and manifests from the images' provenance.
Code in fluxbatch imports from the pieces; the names below are the common ones.
"""

from fluxbatch.state.ledger import Task, TaskStatus
from fluxbatch.state.lock import RootLock
from fluxbatch.state.manifests import ManifestEntry
from fluxbatch.state.placements import Placement
from fluxbatch.state.root import RootState, read_state
from fluxbatch.state.store import Store

__all__ = ["ManifestEntry", "Placement", "RootLock", "RootState", "Store", "Task", "TaskStatus",
           "read_state"]
