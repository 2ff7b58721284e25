"""Can a submit's "sent or not" be read from httpx's own exception classes? A loopback
demonstration for issue 18, through httpx's own transport (httpcore), figures only.

A raw-socket server on 127.0.0.1 answers a first POST on a kept-alive connection, then
treats the second POST on that connection in one of three ways:

- "stale": it closes the connection when the POST arrives, without reading a byte of it,
  as a server does when its keep-alive timer fires just as a request comes in. Nothing
  was processed: it could safely be sent again.
- "received": it reads the whole POST (a real API would have started, and billed, the
  task) and closes without answering, as a server that crashed or was restarted.
- "received, reset": the same, but the close resets the connection.

The client sees ReadError for "stale", RemoteProtocolError ("Server disconnected without
sending a response") for "received", and ReadError again for "received, reset": neither
class tells a request never read from one read whole, so a submit that fails with either
"may have been billed". httpcore also drops a WriteError raised while it writes the
request, and reads the answer instead (`httpcore/_async/http11.py`), so a failed write
surfaces as one of the same two.

A fourth case, "early close", shows httpcore's own guard: when the server closed the idle
connection well before the next request, the pool sees the socket readable and opens a
new connection, so no error is raised. That check runs on every pooled connection before
every request (the CPU that bench_wire.py measures); it narrows the race, and does not
close it.

Run: .venv/bin/python bench/stale_keepalive.py
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import httpx

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    return head


def serve(listener: socket.socket, mode: str, seen: list[str]) -> None:
    conn, _ = listener.accept()
    read_request(conn)
    conn.sendall(ANSWER)
    if mode == "early close":
        conn.close()  # long before the next request: the pool should notice
        conn, _ = listener.accept()
        read_request(conn)
        seen.append("second POST received on a new connection")
        conn.sendall(ANSWER)
    elif mode == "stale":
        conn.recv(1, socket.MSG_PEEK)  # the second POST has arrived: close unread
        seen.append("second POST arrived; closed without reading it")
    else:
        read_request(conn)
        seen.append("second POST read whole; closed without answering")
        if mode == "received, reset":  # (as a crashed process, or a proxy, can: a reset)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


async def case(mode: str) -> str:
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []
    thread = threading.Thread(target=serve, args=(listener, mode, seen), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/flux-dev"
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=8))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.post(url, json={"prompt": "first"})
        if mode == "early close":
            time.sleep(0.2)  # (the server's close reaches this socket)
        try:
            response = await client.post(url, json={"prompt": "second"})
            outcome = f"answered {response.status_code}"
        except httpx.TransportError as error:
            outcome = f"{type(error).__name__}: {error}"
    thread.join(5)
    listener.close()
    return f"{mode:<16} server: {seen[0] if seen else '?'}\n{'':<16} client: {outcome}"


def main() -> None:
    for mode in ("stale", "received", "received, reset", "early close"):
        print(asyncio.run(case(mode)))


if __name__ == "__main__":
    main()
