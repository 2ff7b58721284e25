"""The CPU floor for `bench_render.py`: the leanest client that does the same work in Python.

For each job: POST the body, poll `get_result` until Ready, GET the sample (following the
emulator's redirect), write the file. It is asyncio plus h11 over keep-alive sockets, and
nothing else: no httpx objects, no state store, no outbox, no retries, no timeouts, no
progress reporting, no provenance. It also gets an advantage fluxbatch does not have: it is
told the mean latency L and polls on a schedule made for it (first poll at 0.8 L, then every
0.3 L), so its poll count is comparable without any prediction.

Its CPU per job, measured in the same run against the same emulator, is what Python's event
loop and HTTP parsing cost on this machine; fluxbatch's figure is printed as a ratio to it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11

CONNECTIONS = 16


class _Pool:
    """Keep-alive connections per (host, port); at most CONNECTIONS open."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                     h11.Connection]]] = {}
        self.slots = asyncio.Semaphore(CONNECTIONS)

    async def request(self, method: str, url: str, headers: list[tuple[str, str]],
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        origin = (parts.hostname or "", parts.port or 80)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        async with self.slots:
            idle = self.idle.setdefault(origin, [])
            if idle:
                reader, writer, conn = idle.pop()
            else:
                reader, writer = await asyncio.open_connection(*origin)
                conn = h11.Connection(h11.CLIENT)
            all_headers = [("host", f"{origin[0]}:{origin[1]}"), *headers]
            if body:
                all_headers.append(("content-length", str(len(body))))
            data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
            writer.write(data)
            status, response_headers, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(262144))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                idle.append((reader, writer, conn))
            else:
                writer.close()
            return status, response_headers, b"".join(chunks)

    def close(self) -> None:
        for connections in self.idle.values():
            for _, writer, _ in connections:
                writer.close()


async def _run(base_url: str, model: str, bodies: list[dict[str, Any]], out: Path,
               latency: float, cap: int) -> int:
    pool = _Pool()
    active = asyncio.Semaphore(cap)
    polls = 0
    auth = [("x-key", "floor"), ("content-type", "application/json")]

    async def job(index: int, body: dict[str, Any]) -> None:
        nonlocal polls
        async with active:
            while True:
                status, headers, data = await pool.request(
                    "POST", f"{base_url}/v1/{model}", auth, json.dumps(body).encode())
                if status != 429:
                    break
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            polling_url = json.loads(data)["polling_url"]
            await asyncio.sleep(0.8 * latency)
            while True:
                polls += 1
                _, _, data = await pool.request("GET", polling_url, auth[:1])
                result = json.loads(data)
                if result["status"] == "Ready":
                    break
                await asyncio.sleep(0.3 * latency)
        url = result["result"]["sample"]
        while True:
            status, headers, data = await pool.request("GET", url, [])
            if status not in (301, 302, 303, 307, 308):
                break
            url = headers["location"] if "://" in headers["location"] else \
                base_url + headers["location"]
        (out / f"{index:05d}.jpg").write_bytes(data)

    await asyncio.gather(*(job(i, body) for i, body in enumerate(bodies)))
    pool.close()
    return polls


def run_floor(base_url: str, model: str, bodies: list[dict[str, Any]], out: Path,
              latency: float, cap: int) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, polls) for the floor client doing `bodies`."""
    out.mkdir(parents=True, exist_ok=True)
    cpu, wall = time.process_time(), time.perf_counter()
    polls = asyncio.run(_run(base_url, model, bodies, out, latency, cap))
    return time.process_time() - cpu, time.perf_counter() - wall, polls
