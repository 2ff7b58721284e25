"""A real S3-compatible server on loopback, for the shared store's tests and its bench: moto's,
which enforces `If-None-Match: *` (the conditional create every claim relies on), served in a
thread on 127.0.0.1, recording every request it answers. Its `environ()` holds dummy
credentials, a region, the endpoint, and no instance metadata service: nothing is ever sent
to AWS."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from werkzeug.serving import BaseWSGIServer, make_server


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: str  # as received, one `Name: value` a line
    body: bytes


class S3Server:
    """`with S3Server() as s3:` a moto server on a free loopback port; `s3.requests` lists
    what it answered, `s3.bucket()` makes a bucket, `s3.environ()` is what a client needs."""

    def __init__(self, *, record_bodies: bool = True) -> None:
        self.requests: list[Request] = []
        self.record_bodies = record_bodies
        self._lock = threading.Lock()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> S3Server:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)

        def recording(environ: dict[str, Any], start_response: Any) -> Any:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            import io

            environ["wsgi.input"] = io.BytesIO(body)
            headers = "\n".join(f"{name[5:].replace('_', '-').title()}: {value}"
                                for name, value in environ.items() if name.startswith("HTTP_"))
            with self._lock:
                self.requests.append(Request(environ["REQUEST_METHOD"],
                                             environ.get("PATH_INFO", ""), headers,
                                             body if self.record_bodies else b""))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, recording, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._thread.join()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def environ(self) -> dict[str, str]:
        """What an S3 client (botocore, s3fs) needs to use this server and nothing else."""
        return {"AWS_ACCESS_KEY_ID": "fluxbatch-test", "AWS_SECRET_ACCESS_KEY": "fluxbatch-test",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def bucket(self, name: str | None = None) -> str:
        """A new, empty bucket; its name."""
        name = name or f"fluxbatch-{uuid.uuid4().hex[:12]}"
        response = httpx.put(f"{self.endpoint}/{name}")
        assert response.status_code == 200, response.text
        return name

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def objects(self, bucket: str) -> Iterator[tuple[str, bytes]]:
        """Every object in `bucket`: its name and bytes (straight from moto's backend)."""
        from moto.s3.models import s3_backends

        for backend in s3_backends.values():
            for region in backend.values():
                found = region.buckets.get(bucket)
                if found is not None:
                    for name, key in found.keys.items():
                        yield name, key.value
                    return
