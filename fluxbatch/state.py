"""The state: what has been rendered, under which key. (Grown into a store by later work.)"""

from __future__ import annotations

import json
from pathlib import Path

from fluxbatch.plan import Record

MANIFEST = "manifest.json"


def read_records(root: Path) -> dict[str, Record]:
    """Records by output path, read from the manifest; empty when there is none yet."""
    try:
        document = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {
        image["path"]: Record(key=image["key"], status=image.get("status", "written"),
                              sha256=image.get("sha256"), size=image.get("bytes"))
        for image in document.get("images", [])
    }
