"""No per-image scan anywhere: every statement the store runs for one image finds its rows
through an index, so the CPU an image costs does not grow with the output root (a full-table
scan per image was 9 ms at 20,000 rows). Checked with SQLite's own query plans, not a clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fluxbatch.state.ledger import TaskStatus
from fluxbatch.state.store import Store

KEY = "a" * 64
ENTRY = {"path": "x/1.png", "sha256": "b" * 64, "bytes": 10}


def test_every_statement_for_one_image_uses_an_index(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        for n in range(50):  # (a table with rows, so that a scan would be the planner's choice)
            store.placed("r", f"o{n}", f"{n:064x}", dict(ENTRY, path=f"p/{n}.png"), 1)
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        store.submitting(KEY, "bfl", None, "run")
        store.not_sent(KEY)
        store.submitting(KEY, "bfl", None, "run")
        store.submitted(KEY, "task", "https://api.bfl.ai/v1/get_result?id=task", 4.0, 1.0)
        store.ended(KEY, TaskStatus.SUBMITTED, "still pending")
        store.ready(KEY, 7)
        store.fetched(KEY, "c" * 64)
        store.task(KEY)
        store.placed("r", "x/1", KEY, ENTRY, 1)
        store.touch("r", "x/1", 2)
        store.entry("r", "x/1")
        store.others_at("x/1.png", "r")
        store.ended(KEY, TaskStatus.FAILED, "why")
        store.forget("r", ["x/1"])
        store.db.set_trace_callback(None)

        scans = {}
        for sql in statements:
            if sql.split()[0].upper() not in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                continue  # (BEGIN, COMMIT, SAVEPOINT...)
            plan = [row[3] for row in sqlite3.Connection.execute(
                store.db, f"EXPLAIN QUERY PLAN {sql}")]
            scans.update({sql: plan} if any(line.startswith("SCAN") for line in plan) else {})
    assert len(statements) >= 14
    assert scans == {}
