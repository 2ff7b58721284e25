"""The routes: BFL's `/v1/...`, CometAPI's `/flux/v1/...` and the signed `/delivery/...` URLs.

`Api.route` does the cheap, fault-free part of a request (path, method, auth, signature) and
either answers at once or hands back the work to do; the server decides whether to inject a
fault around that work.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import IO
from urllib.parse import parse_qs, urlsplit

from fluxbatch import models
from fluxbatch.emulator import inputs, tasks
from fluxbatch.emulator.config import EmulatorConfig
from fluxbatch.emulator.images import render_image, requested_size
from fluxbatch.emulator.validation import comet_message, parse_body
from fluxbatch.identity import job_key

BFL_PREFIX = "/v1/"
COMET_PREFIX = "/flux/v1/"
DELIVERY_PREFIX = "/delivery/"
DURABLE = "durable"
# Bodies past this size carry images, whose checks decode them: off the event loop, so that
# other connections are not kept waiting. Smaller bodies are parsed in line, in arrival order.
PARSE_IN_THREAD = 64 * 1024
BFL_AUTH_FAILED = "Not authenticated - Invalid Authentication"
# CometAPI's balance query, served on its own host (`query.cometapi.com`): the key travels in
# the query string.
QUOTA_PATH = "/user/quota"


@dataclass(frozen=True, slots=True)
class Incoming:
    method: str
    target: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Routed:
    """Either a final `reply` (faults never apply) or the `work` that produces one."""

    reply: Reply | None = None
    work: Callable[[], Awaitable[Reply]] | None = None
    comet: bool = False
    is_submit: bool = False


def json_reply(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Reply(status, body, headers=headers or [])


def comet_error(status: int, message: str, code: str, param: str = "") -> Reply:
    request_id = uuid.uuid4().hex[:24]
    error = {
        "message": f"{message} (request id: {request_id})",
        "type": "comet_api_error",
        "param": param,
        "code": code,
    }
    return json_reply(status, {"error": error})


def azure_error(status: int, code: str, message: str, detail: str = "") -> Reply:
    extra = f"<AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail>" if detail else ""
    text = (
        '<?xml version="1.0" encoding="utf-8"?><Error>'
        f"<Code>{code}</Code><Message>{message}\nRequestId:{uuid.uuid4()}\n"
        f"Time:{formatdate(usegmt=True)}</Message>{extra}</Error>"
    )
    return Reply(status, text.encode(), content_type="application/xml")


class Api:
    def __init__(
        self,
        config: EmulatorConfig,
        base_url: str,
        table: tasks.TaskTable,
        stats: tasks.Stats,
        submissions: list[dict[str, object]],
        log: IO[str] | None,
    ) -> None:
        self.config = config
        self.base_url = base_url
        self.table = table
        self.stats = stats
        self.submissions = submissions
        # Per account (its key; "" when there is only one): credits left, and charged and
        # not refunded.
        self.credits = {account.key: account.credits if account.credits is not None
                        else config.credits for account in config.accounts} or \
            {"": config.credits}
        self.used = dict.fromkeys(self.credits, 0.0)
        self._log = log
        self._secret = secrets.token_bytes(32)
        self._shedding = random.Random(f"{config.seed}:shed")
        self._inputs: dict[str, str] = {}

    # -- routing -------------------------------------------------------------------------

    def route(self, request: Incoming) -> Routed:
        self.stats.requests += 1
        parts = urlsplit(request.target)
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
        if path.startswith(COMET_PREFIX):
            return self._route_comet(request, path.removeprefix(COMET_PREFIX), query)
        if path.startswith(BFL_PREFIX):
            return self._route_bfl(request, path.removeprefix(BFL_PREFIX), query)
        if path.startswith(DELIVERY_PREFIX):
            return self._route_delivery(request, path, query)
        if path.rstrip("/") == QUOTA_PATH:
            return self._route_quota(request, query)
        return Routed(reply=json_reply(404, {"detail": "Not Found"}))

    def _route_bfl(self, request: Incoming, rest: str, query: dict[str, str]) -> Routed:
        method = {"credits": "GET", "get_result": "GET"}.get(rest, "POST")
        if method == "POST" and models.get(rest) is None:
            return Routed(reply=json_reply(404, {"detail": "Not Found"}))
        if request.method != method:
            return Routed(reply=json_reply(405, {"detail": "Method Not Allowed"}))
        owner = self._owner(request.headers.get("x-key", ""))
        if owner is None:
            self.stats.rejected_auth += 1
            return Routed(reply=json_reply(403, {"detail": BFL_AUTH_FAILED}))
        if rest == "credits":
            return Routed(work=lambda: self._credits(owner))
        if rest == "get_result":
            return Routed(work=lambda: self._poll(query.get("id"), comet=False, owner=owner))
        return Routed(work=lambda: self._submit(rest, request.body, "bfl", owner),
                      is_submit=True)

    def _route_comet(self, request: Incoming, rest: str, query: dict[str, str]) -> Routed:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        owner = self._owner(token.strip()) if scheme.lower() == "bearer" else None
        if owner is None:
            self.stats.rejected_auth += 1
            return Routed(reply=comet_error(401, "Invalid token", "invalid_api_key"), comet=True)
        if rest == "get_result":
            if request.method != "GET":
                return Routed(reply=comet_error(405, "Method Not Allowed", "method_not_allowed"))
            return Routed(work=lambda: self._poll(query.get("id"), comet=True, owner=owner),
                          comet=True)
        if models.get(rest) is None:
            message = f"Invalid URL ({request.method} {COMET_PREFIX}{rest})"
            return Routed(reply=comet_error(404, message, "not_found"), comet=True)
        if request.method != "POST":
            return Routed(reply=comet_error(405, "Method Not Allowed", "method_not_allowed"))
        return Routed(
            work=lambda: self._submit(rest, request.body, "comet", owner), comet=True,
            is_submit=True,
        )

    def _route_quota(self, request: Incoming, query: dict[str, str]) -> Routed:
        if request.method != "GET":
            return Routed(reply=comet_error(405, "Method Not Allowed", "method_not_allowed"))
        owner = self._owner(query.get("key", ""))
        if owner is None:
            self.stats.rejected_auth += 1
            return Routed(reply=comet_error(401, "Invalid token", "invalid_api_key"), comet=True)
        return Routed(work=lambda: self._quota(owner), comet=True)

    def _owner(self, key: str) -> str | None:
        """The account `key` opens ("" when there is only one), or None: refused."""
        if not key:
            return None
        if self.config.accounts:
            return next((account.key for account in self.config.accounts
                         if hmac.compare_digest(key.encode(), account.key.encode())), None)
        expected = self.config.key
        return "" if expected is None or hmac.compare_digest(key.encode(),
                                                             expected.encode()) else None

    # -- submit, poll, credits ------------------------------------------------------------

    async def _submit(self, model: str, raw: bytes, route: str, owner: str = "") -> Reply:
        comet = route == "comet"
        if len(raw) > PARSE_IN_THREAD:
            body, errors = await asyncio.to_thread(parse_body, model, raw)
        else:
            body, errors = parse_body(model, raw)
        if body is None:
            self.stats.rejected_422 += 1
            if comet:
                param = str(errors[0]["loc"][-1]) if errors else ""
                return comet_error(422, comet_message(errors), "invalid_request", param)
            return json_reply(422, {"detail": errors})
        # One copy of each distinct input however many tasks send it (a batch of 10 looks
        # over 1,000 photos sends each photo 10 times); a task keeps its body until served.
        for name in inputs.image_fields(model):
            value = body.get(name)
            if isinstance(value, str):
                body[name] = self._inputs.setdefault(value, value)
        sizes = {name: inputs.size_of(value) for name, value in inputs.given(model, body)}
        billed = {**body, **{name: {"width": size[0], "height": size[1]}
                             for name, size in sizes.items() if size is not None}}
        cost = models.estimate_cost(model, billed)
        credits = self.config.cost if self.config.cost is not None else \
            round(cost * 100, 4) if cost is not None else None
        if credits is not None and credits > self.credits[owner]:
            message = "Insufficient credits"
            return (
                comet_error(402, message, "insufficient_quota")
                if comet
                else json_reply(402, {"detail": message})
            )
        now = time.monotonic()
        refusal = self.table.refusal(model, now, owner)
        if refusal is not None:
            return self._too_many(refusal, comet)
        if self.config.shed_rate and self._shedding.random() < self.config.shed_rate:
            return self._shed(comet)
        task = self.table.add(model, body, route, now, time.time(), owner)
        self.stats.peak_active = max(self.stats.peak_active, self.table.active(now))
        if self.config.accounts:
            stats = self.stats
            stats.peak_by_account[owner] = max(stats.peak_by_account.get(owner, 0),
                                               self.table.active(now, owner=owner))
            stats.submits_by_account[owner] = stats.submits_by_account.get(owner, 0) + 1
        if credits is not None:
            self.credits[owner] -= credits
            self.used[owner] += credits
            task.cost = credits
        self._record(task)
        width, height = requested_size(model, body)
        input_mp = sum(math.ceil(size[0] * size[1] / 10_000) / 100 if size else 1.0
                       for name, size in sizes.items() if name.startswith("input_image"))
        return json_reply(
            200,
            {
                "id": task.id,
                # On CometAPI too: the gateway is believed to pass BFL's own polling URL
                # through (it wants an x-key), so clients must poll /flux/v1/get_result?id=.
                "polling_url": f"{self.base_url}/v1/get_result?id={task.id}",
                "cost": credits if self.config.report_cost else None,
                "input_mp": round(input_mp, 2),
                "output_mp": round(width * height / 1_000_000, 2),
            },
        )

    def _too_many(self, refusal: tasks.Refusal, comet: bool) -> Reply:
        self.stats.rejected_429 += 1
        scope = f" for {refusal.model}" if refusal.model else ""
        message = (
            f"Too many active tasks: the limit{scope} is {refusal.cap}; wait for one to finish"
        )
        reply = (
            comet_error(429, message, "rate_limit_exceeded")
            if comet
            else json_reply(429, {"detail": message})
        )
        if self.config.retry_after_header:
            reply.headers.append(("retry-after", str(max(1, math.ceil(refusal.wait)))))
        return reply

    def _shed(self, comet: bool) -> Reply:
        """A 429 below the caps, as a gateway that sheds load sends: no Retry-After."""
        self.stats.rejected_429 += 1
        self.stats.shed_429 += 1
        message = "Too many requests: the service is busy; try again shortly"
        if comet:
            return comet_error(429, message, "rate_limit_exceeded")
        return json_reply(429, {"detail": message})

    def _record(self, task: tasks.Task) -> None:
        self.stats.submits += 1
        self.submissions.append(
            {
                "task_id": task.id,
                "model": task.model,
                "request": task.request,
                "route": task.route,
                "account": task.owner,  # the key that submitted it ("": the only account)
                "time": task.start_time,
                # when it is Ready; `task_ttl` seconds later the emulator forgets it
                "duration": task.duration,
            }
        )
        if self._log is not None:
            line = {
                "time": task.start_time,
                "task_id": task.id,
                "model": task.model,
                "route": task.route,
                "key": job_key(task.model, task.request),
                "prompt": task.request.get("prompt"),
                "seed": task.request.get("seed"),
                "reported_seed": task.seed,
            }
            self._log.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._log.flush()

    async def _credits(self, owner: str = "") -> Reply:
        self._refund(time.monotonic())
        return json_reply(200, {"credits": round(self.credits[owner], 4)})

    async def _quota(self, owner: str = "") -> Reply:
        """CometAPI's shape: the account's balance in USD, and per key what it used."""
        self._refund(time.monotonic())
        return json_reply(200, {
            "username": "emulator",
            "total_quota": round(self.credits[owner] / 100, 6),
            "total_used_quota": round(self.used[owner] / 100, 6),
            "request_count": self.stats.submits,
            "keys": [{"name": "default", "remain_quota": -1,
                      "used_quota": round(self.used[owner] / 100, 6)}],
        })

    def _refund(self, now: float) -> None:
        """Moderated and failed tasks are not billed: their credits come back once they end."""
        for task in self.table.ended_unbilled(now):
            self._refund_task(task)

    def _refund_task(self, task: tasks.Task) -> None:
        if task.refunded or not task.cost:
            return
        task.refunded = True
        self.credits[task.owner] += task.cost
        self.used[task.owner] -= task.cost

    def balance(self, key: str = "") -> float:
        """Credits left (of the account of `key`, with several), moderated and failed tasks
        refunded."""
        self._refund(time.monotonic())
        return self.credits[key]

    async def _poll(self, task_id: str | None, comet: bool, owner: str = "") -> Reply:
        if task_id is None:
            error = {"loc": ["query", "id"], "msg": "Field required", "type": "missing"}
            if comet:
                return comet_error(422, "query.id: Field required", "invalid_request", "id")
            return json_reply(422, {"detail": [error]})
        self.stats.polls += 1
        now = time.monotonic()
        task = self.table.get(task_id, now)
        if task is not None and task.owner != owner:  # another account's: not shown
            self.stats.foreign_polls += 1
            task = None
        if task is None:
            return json_reply(200, {"id": task_id, "status": tasks.NOT_FOUND})
        if task.outcome in tasks.UNBILLED and task.status(now) == task.outcome:
            self._refund_task(task)
        return json_reply(200, self._poll_body(task, now))

    def _poll_body(self, task: tasks.Task, now: float) -> dict[str, object]:
        status = task.status(now)
        body: dict[str, object] = {
            "id": task.id,
            "status": status,
            "result": None,
            "progress": task.progress(now) if status == tasks.PENDING else None,
            "details": None,
            "preview": None,
        }
        if status == tasks.READY:
            body["result"] = {
                "sample": self._sample_url(task),
                "prompt": task.request.get("prompt") or "",
                "seed": task.seed,
                "start_time": task.start_time,
                "end_time": task.end_time,
                "duration": task.duration,
            }
        elif status in (tasks.REQUEST_MODERATED, tasks.CONTENT_MODERATED):
            stage = "request" if status == tasks.REQUEST_MODERATED else "content"
            body["details"] = {"Moderation Reasons": [f"emulated {stage} moderation"]}
        elif status == tasks.ERROR:
            body["details"] = {"error": "emulated generation failure ([[error]] in the prompt)"}
        return body

    # -- delivery -------------------------------------------------------------------------

    def _sample_url(self, task: tasks.Task) -> str:
        expiry = f"{task.end_time + self.config.url_ttl:.3f}"
        return self._signed(f"{DELIVERY_PREFIX}{task.id}/sample.{task.fmt}", expiry)

    def _signed(self, path: str, expiry: str) -> str:
        return f"{self.base_url}{path}?se={expiry}&sig={self._signature(path, expiry)}"

    def _signature(self, path: str, expiry: str) -> str:
        return hmac.new(self._secret, f"{path}\n{expiry}".encode(), hashlib.sha256).hexdigest()

    def _route_delivery(self, request: Incoming, path: str, query: dict[str, str]) -> Routed:
        if "x-key" in request.headers or "authorization" in request.headers:
            self.stats.leaked_auth_downloads += 1
        expiry, signature = query.get("se", ""), query.get("sig", "")
        if not hmac.compare_digest(signature, self._signature(path, expiry)):
            return Routed(
                reply=azure_error(
                    403, "AuthenticationFailed", _AUTH_MESSAGE, "Signature did not match"
                )
            )
        if time.time() > _float(expiry):
            detail = f"Signed expiry time [{expiry}] must be after the current time"
            return Routed(reply=azure_error(403, "AuthenticationFailed", _AUTH_MESSAGE, detail))
        rest = path.removeprefix(DELIVERY_PREFIX).split("/")
        durable = rest[0] == DURABLE
        task_id = rest[1] if durable else rest[0]
        if self.config.redirect_downloads and not durable:
            target = self._signed(f"{DELIVERY_PREFIX}{DURABLE}/{task_id}/{rest[-1]}", expiry)
            return Routed(work=lambda: self._redirect(target))
        return Routed(work=lambda: self._download(task_id))

    async def _redirect(self, location: str) -> Reply:
        self.stats.redirects += 1
        return Reply(302, b"", content_type="text/plain", headers=[("location", location)])

    async def _download(self, task_id: str) -> Reply:
        task = self.table.get(task_id, time.monotonic())
        if task is None:
            return azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        image, content_type, _ = await asyncio.to_thread(
            render_image, task.model, task.pixel_request, self.config.max_side
        )
        self.stats.downloads += 1
        return Reply(200, image, content_type=content_type)

    def server_error(self, comet: bool, status: int) -> Reply:
        if status == 502:
            return Reply(502, _BAD_GATEWAY, content_type="text/html")
        phrase = "Internal Server Error" if status == 500 else "Service Unavailable"
        if comet:
            return comet_error(status, phrase, "internal_error" if status == 500 else "")
        return json_reply(status, {"detail": phrase})


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -math.inf


_AUTH_MESSAGE = (
    "Server failed to authenticate the request. Make sure the value of Authorization header "
    "is formed correctly including the signature."
)
_BAD_GATEWAY = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
