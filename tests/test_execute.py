"""The executor against a BFL-shaped API faked at the transport (fluxbatch's `Wire` over
`httpx.MockTransport`). Time is fake: requested sleeps are recorded and advance a clock,
so nothing here really waits. The pacing tests run on virtual time instead (`VirtualTime`),
where concurrent sleeps overlap as they would on a real clock."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from fluxbatch import providers
from fluxbatch.errors import StateError
from fluxbatch.execute import Executor, Image, PoolAccount, Settings, Unusable
from fluxbatch.expand import Job
from fluxbatch.matrix import Combination
from fluxbatch.money import Budget
from fluxbatch.outcomes import Event, JobFailed, LocalFault, Outcome
from fluxbatch.providers import Polled, Secret, Submitted
from fluxbatch.providers.bfl import Bfl
from fluxbatch.providers.cometapi import CometApi
from fluxbatch.wire import Wire
from tests.helpers import run_in_virtual_time

# What a paid task whose bytes could not be fetched says: the next run collects it.
AGAIN = "; the next run downloads it again without paying (or --force pays for a new one)"

BASE = "https://api.bfl.ai"
POLL_BASE = "https://api.eu4.bfl.ai"  # a regional host, unlike the submit host
DELIVERY = "https://delivery.eu2.bfl.ai"
KEY = "sk-test-key"
PNG = b"\x89PNG\r\n\x1a\n fake image"
AZURE_EXPIRED = (
    '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
    "<Message>Server failed to authenticate the request.\nRequestId:1\nTime:now</Message>"
    "</Error>"
)

Scripted = httpx.Response | Exception | dict[str, Any]


def make_job(index: int, prompt: str | None = None, model: str = "flux-pro-1.1") -> Job:
    return Job(index=index, job="test", vars={"n": index}, replicate=1, model=model,
               request={"prompt": prompt or f"image {index}", "seed": index}, seed=index,
               key=f"key-{index}", output=f"out/{index}.png",
               combination=Combination({"n": index}, "single"))


def backoffs(*ceilings: float) -> list[float]:
    """What the executor's jittered backoff draws from `random.Random(0)`."""
    rng = random.Random(0)
    return [rng.uniform(ceiling / 4, ceiling) for ceiling in ceilings]


def error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"detail": detail}, headers=headers)


def pending(progress: float | None = None, status: str = "Pending") -> dict[str, Any]:
    return {"status": status, "result": None, "progress": progress}


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class VirtualTime:
    """Time on a `VirtualTimeLoop`: sleeps are recorded and really wait, in virtual seconds,
    so that tasks overlap as on a real clock (a FakeTime adds up every sleep, however many
    run at once)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.last = 0.0  # the time when the loop last ran: after a run, when it ended

    @property
    def now(self) -> float:
        with contextlib.suppress(RuntimeError):  # (no loop runs)
            self.last = asyncio.get_running_loop().time()
        return self.last

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(seconds)


class FakeApi:
    """BFL's routes. Replies can be scripted per prompt; unscripted, a submit is accepted, a
    task is Pending (with linear progress) for `durations[prompt]` seconds, then Ready, and
    its sample downloads as a PNG."""

    def __init__(self, time: FakeTime | VirtualTime) -> None:
        self.time = time
        self.requests: list[httpx.Request] = []
        self.submits: dict[str, deque[Scripted]] = defaultdict(deque)
        self.polls: dict[str, deque[Scripted]] = defaultdict(deque)
        self.downloads: dict[str, deque[Scripted]] = defaultdict(deque)
        self.durations: dict[str, float] = {}
        self.report_progress = True
        self.tasks: dict[str, tuple[str, float]] = {}  # id → (prompt, submitted at)
        self.on_request: Callable[[httpx.Request], None] = lambda request: None
        # Let other tasks run while a submit is "on the wire", as a real network would.
        self.yield_on_submit = False
        self.posts_open = 0
        self.peak_posts_before_first_answer = 0
        # The account's cap: a submit while this many tasks are Pending is answered 429.
        self.cap: int | None = None
        self.cap_headers: dict[str, str] = {}
        self.refused_at_cap: list[float] = []  # when
        self.peak_active = 0
        self.cost: float | None = 4.0  # credits each accepted submit reports

    def posts(self) -> list[httpx.Request]:
        return [q for q in self.requests if q.method == "POST"]

    def polls_of(self, task_id: str) -> list[httpx.Request]:
        return [q for q in self.requests if q.url.path == "/v1/get_result"
                and q.url.params.get("id") == task_id]

    def downloads_made(self) -> list[httpx.Request]:
        return [q for q in self.requests if q.url.host.startswith("delivery.")]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https"):  # (as aiohttp refuses it)
            raise httpx.UnsupportedProtocol(f"{request.url.scheme}:// is not http(s)",
                                            request=request)
        self.requests.append(request)
        self.on_request(request)
        if request.method == "POST":
            prompt = str(_json(request)["prompt"])
            if self.yield_on_submit:
                self.posts_open += 1
                if not self.tasks:
                    self.peak_posts_before_first_answer = max(
                        self.peak_posts_before_first_answer, self.posts_open)
                for _ in range(5):
                    await asyncio.sleep(0)
                self.posts_open -= 1
            return _reply(self.submits[prompt]) or self._over_cap() or self._accept(prompt)
        task_id = request.url.params.get("id") or request.url.params["task"]
        prompt, submitted = self.tasks[task_id]
        if request.url.host.startswith("delivery."):
            return _reply(self.downloads[prompt]) or httpx.Response(
                200, content=PNG, headers={"content-type": "image/png"})
        return _reply(self.polls[prompt]) or self._status(task_id, prompt, submitted)

    def active(self) -> int:
        return sum(1 for prompt, submitted in self.tasks.values()
                   if self.time.now - submitted < self.durations.get(prompt, 0.0))

    def _over_cap(self) -> httpx.Response | None:
        if self.cap is None or self.active() < self.cap:
            return None
        self.refused_at_cap.append(self.time.now)
        return error(429, "Too many active tasks", self.cap_headers)

    def _accept(self, prompt: str) -> httpx.Response:
        task_id = f"task-{len(self.tasks) + 1}"
        self.tasks[task_id] = (prompt, self.time.now)
        self.peak_active = max(self.peak_active, self.active())
        return httpx.Response(200, json={
            "id": task_id, "polling_url": f"{POLL_BASE}/v1/get_result?id={task_id}",
            "cost": self.cost})

    def _status(self, task_id: str, prompt: str, submitted: float) -> httpx.Response:
        elapsed = self.time.now - submitted
        duration = self.durations.get(prompt, 0.0)
        if elapsed < duration:
            return httpx.Response(200, json=pending(
                elapsed / duration if self.report_progress else None))
        return httpx.Response(200, json=self.ready(task_id))

    def ready(self, task_id: str) -> dict[str, Any]:
        sample = f"{DELIVERY}/results/sample.png?task={task_id}&sig={len(self.requests)}"
        return {"id": task_id, "status": "Ready", "result": {"sample": sample, "seed": 42}}


def _json(request: httpx.Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.content)
    return body


def _reply(script: deque[Scripted]) -> httpx.Response | None:
    if not script:
        return None
    item = script.popleft()
    if isinstance(item, Exception):
        raise item
    if isinstance(item, dict):
        return httpx.Response(200, json=item)
    return item


class FakeJournal:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Any]] = []
        self.broken_at: str | None = None  # this call raises, as a full disk would
        self.reserved: list[tuple[int, float | None]] = []  # (index, USD held) per send

    def _record(self, name: str, index: int, detail: Any) -> None:
        self.calls.append((name, index, detail))
        if name == self.broken_at:
            raise StateError("state.sqlite: cannot record in the state store (database or "
                             "disk is full)")

    def of(self, index: int) -> list[str]:
        return [name for name, i, _ in self.calls if i == index]

    def reserve(self, job: Job, usd: float | None, account: str | None = None) -> None:
        self.reserved.append((job.index, usd))

    def submitting(self, job: Job, account: str | None = None) -> None:
        self._record("submitting", job.index, None)

    def not_sent(self, job: Job) -> None:
        self._record("not_sent", job.index, None)

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None:
        self._record("submitted", job.index, submitted.task_id)

    def ready(self, job: Job, polled: Polled) -> None:
        self._record("ready", job.index, polled.reported_seed)

    def finished(self, outcome: Outcome) -> None:
        self.calls.append(("finished", outcome.job.index, outcome.status))


class FakeWriter:
    def __init__(self) -> None:
        self.written: list[tuple[int, bytes, str | None]] = []
        self.failures: dict[int, str] = {}
        self.faults: dict[int, LocalFault] = {}
        self.unusable: dict[int, int] = {}  # how many downloads of the job are garbage

    async def __call__(self, job: Job, image: Image, outcome: Outcome) -> Any:
        if job.index in self.failures:
            raise JobFailed(self.failures[job.index])
        if job.index in self.faults:
            raise self.faults[job.index]
        if self.unusable.get(job.index):
            self.unusable[job.index] -= 1
            raise Unusable("the provider's image is unusable: PNG is truncated at byte 10")
        self.written.append((job.index, image.read(), image.content_type))
        return f"wrote {job.output}"


@dataclass
class Harness:
    time: FakeTime | VirtualTime = field(default_factory=FakeTime)
    journal: FakeJournal = field(default_factory=FakeJournal)
    writer: FakeWriter = field(default_factory=FakeWriter)
    events: list[Event] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    api: FakeApi = field(init=False)
    executor: Executor | None = None
    prepare: Callable[[Job], Awaitable[Mapping[str, Any]]] | None = None
    submit_via: Callable[[Job, str | None],
                         Callable[[httpx.Request], Awaitable[httpx.Response]]] | None = None
    provider: providers.Provider = field(
        default_factory=lambda: Bfl(providers.REGISTRY["bfl"], BASE, Secret(KEY)))
    budget: Budget | None = None
    accounts: list[PoolAccount] | None = None

    def __post_init__(self) -> None:
        self.api = FakeApi(self.time)

    def run(self, jobs: Iterable[Job], attach: Mapping[str, Submitted] | None = None,
            started: Callable[[Executor], None] = lambda executor: None) -> list[Outcome]:
        async def main() -> list[Outcome]:
            transport = httpx.MockTransport(self.api.handle)
            async with Wire(transport) as wire:
                self.executor = Executor(
                    self.provider, wire, journal=self.journal, writer=self.writer,
                    settings=self.settings, on_event=self.events.append,
                    sleep=self.time.sleep, clock=self.time.clock, rng=random.Random(0),
                    prepare=self.prepare, submit_via=self.submit_via, budget=self.budget,
                    accounts=self.accounts)
                started(self.executor)
                return await self.executor.run(list(jobs), attach)

        if isinstance(self.time, VirtualTime):
            return run_in_virtual_time(main())
        return asyncio.run(main())


@pytest.fixture
def h() -> Harness:
    return Harness()


def statuses(outcomes: list[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


# -- statuses ---------------------------------------------------------------------------------


def test_ready_task_is_downloaded_at_once_without_auth_and_written(h: Harness) -> None:
    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == ("written", None)
    assert outcome.written == "wrote out/0.png"
    assert outcome.submitted == Submitted("task-1", f"{POLL_BASE}/v1/get_result?id=task-1", 4.0)
    assert [(q.method, str(q.url)) for q in h.api.requests] == [
        ("POST", f"{BASE}/v1/flux-pro-1.1"),
        ("GET", f"{POLL_BASE}/v1/get_result?id=task-1"),
        ("GET", f"{DELIVERY}/results/sample.png?task=task-1&sig=2"),
    ]
    submit, poll, download = h.api.requests
    assert submit.headers["x-key"] == poll.headers["x-key"] == KEY
    assert "x-key" not in download.headers and "authorization" not in download.headers
    assert h.writer.written == [(0, PNG, "image/png")]
    assert h.journal.calls == [("submitting", 0, None), ("submitted", 0, "task-1"),
                               ("ready", 0, 42), ("finished", 0, "written")]
    assert h.time.sleeps == [0.5]


def test_cometapi_task_is_polled_on_its_own_get_result_with_bearer() -> None:
    comet = "https://api.cometapi.com"
    h = Harness(provider=CometApi(providers.REGISTRY["cometapi"], comet, Secret(KEY)))

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert [(q.method, str(q.url)) for q in h.api.requests] == [
        ("POST", f"{comet}/flux/v1/flux-pro-1.1"),
        ("GET", f"{comet}/flux/v1/get_result?id=task-1"),
        ("GET", f"{DELIVERY}/results/sample.png?task=task-1&sig=2"),
    ]
    submit, poll, download = h.api.requests
    assert submit.headers["authorization"] == poll.headers["authorization"] == f"Bearer {KEY}"
    assert "x-key" not in download.headers and "authorization" not in download.headers


def test_pending_and_unknown_nonterminal_statuses_keep_polling(h: Harness) -> None:
    h.api.polls["image 0"].extend([pending(), pending(status="Processing"),
                                   pending(status="Queued"), pending()])

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.polls_of("task-1")) == 5
    assert len(h.api.posts()) == 1


def test_download_follows_redirects_and_never_sends_the_key(h: Harness) -> None:
    h.api.downloads["image 0"].append(httpx.Response(
        302, headers={"location": f"{DELIVERY}/durable/sample.png?task=task-1"}))

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    downloads = h.api.downloads_made()
    assert [q.url.path for q in downloads] == ["/results/sample.png", "/durable/sample.png"]
    for request in downloads:
        assert "x-key" not in request.headers
        assert "authorization" not in request.headers
    assert h.writer.written == [(0, PNG, "image/png")]


def test_poll_redirected_to_another_host_does_not_carry_the_key(h: Harness) -> None:
    h.api.polls["image 0"].extend([
        httpx.Response(307, headers={"location": "/v1/get_result?id=task-1&hop=1"}),
        httpx.Response(307, headers={"location": "https://api.eu2.bfl.ai/v1/get_result?id=task-1"}),
    ])

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    first, same_host, other_host = h.api.polls_of("task-1")
    assert (first.url.host, same_host.url.host, other_host.url.host) == (
        "api.eu4.bfl.ai", "api.eu4.bfl.ai", "api.eu2.bfl.ai")
    assert first.headers["x-key"] == same_host.headers["x-key"] == KEY
    assert "x-key" not in other_host.headers


@pytest.mark.parametrize("status", ["Request Moderated", "Content Moderated"])
def test_moderated_task_ends_moderated_and_is_never_resubmitted(h: Harness, status: str) -> None:
    h.api.polls["image 0"].append(
        {"status": status, "details": {"Moderation Reasons": ["Derivative Works Filter"]}})

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "moderated"
    assert outcome.reason == f"{status} (Moderation Reasons: Derivative Works Filter)"
    assert len(h.api.posts()) == 1
    assert h.api.downloads_made() == []
    assert h.journal.of(0) == ["submitting", "submitted", "finished"]


def test_error_status_ends_failed_with_its_details(h: Harness) -> None:
    h.api.polls["image 0"].append({"status": "Error", "details": {"error": "GPU fell over"}})

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "failed"
    assert outcome.reason == "the task ended with status 'Error' (error: GPU fell over)"
    assert len(h.api.posts()) == 1


def test_task_not_found_is_polled_again_a_few_times_then_the_task_is_gone(h: Harness) -> None:
    h.api.polls["image 0"].extend([{"status": "Task not found"}] * 5)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "gone"  # (only now may the next run pay for it again)
    assert outcome.reason == ("the provider no longer knows task task-1 ('Task not found'; "
                              "results expire)")
    assert len(h.api.polls_of("task-1")) == h.settings.not_found_attempts == 3
    assert h.time.sleeps == [0.5, *backoffs(1.0, 2.0)]
    assert len(h.api.posts()) == 1


def test_task_not_found_once_then_ready_is_written(h: Harness) -> None:
    h.api.polls["image 0"].append({"status": "Task not found"})

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.polls_of("task-1")) == 2


def test_task_not_found_answers_count_only_in_a_row(h: Harness) -> None:
    """A live, paid task that a regional cluster sometimes does not find is not given up
    (the next run would pay for it again): a Pending in between resets the count."""
    not_found = {"status": "Task not found"}
    h.api.polls["image 0"].extend([not_found, not_found, pending(), not_found, not_found,
                                   pending(), not_found])

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.polls_of("task-1")) == 8
    assert len(h.api.posts()) == 1


# -- submit errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "message"), [
    (error(500, "Internal Server Error"), "HTTP 500: Internal Server Error"),
    (httpx.Response(502, text="<html><head><title>502 Bad Gateway</title></head></html>"),
     "HTTP 502: 502 Bad Gateway (HTML page)"),
    (httpx.Response(503), "HTTP 503: Service Unavailable"),
])
def test_submit_5xx_is_unknown_and_never_resubmitted(h: Harness, reply: httpx.Response,
                                                     message: str) -> None:
    h.api.submits["image 0"].append(reply)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "unknown"
    assert outcome.reason == (f"the provider answered {message}; the task may have been "
                              "created and billed")
    assert len(h.api.posts()) == 1
    assert h.journal.of(0) == ["submitting", "finished"]  # never "not_sent": maybe billed


def test_cometapi_500_invalid_request_is_a_definite_failure(h: Harness) -> None:
    h.api.submits["image 0"].append(httpx.Response(500, json={"error": {
        "message": "bad body", "type": "comet_api_error", "code": "invalid_request"}}))

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == (
        "failed", "rejected: HTTP 500: bad body (invalid_request)")
    assert len(h.api.posts()) == 1


@pytest.mark.parametrize(("exception", "described"), [
    (httpx.ReadTimeout("timed out"), "ReadTimeout: timed out"),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."),
     "RemoteProtocolError: Server disconnected without sending a response."),
    (httpx.ReadError("Connection reset by peer"), "ReadError: Connection reset by peer"),
])
def test_submit_whose_answer_is_lost_is_unknown_and_never_resubmitted(
        h: Harness, exception: Exception, described: str) -> None:
    h.api.submits["image 0"].append(exception)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "unknown"
    assert outcome.reason == ("the submit may have reached the provider, but its answer was "
                              f"lost ({described})")
    assert len(h.api.posts()) == 1
    assert h.journal.of(0) == ["submitting", "finished"]


def test_connection_refused_on_submit_is_retried_then_succeeds(h: Harness) -> None:
    h.api.submits["image 0"].extend([httpx.ConnectError("Connection refused"),
                                     httpx.ConnectTimeout("timed out")])

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.posts()) == 3
    assert h.journal.of(0) == ["submitting", "not_sent", "submitting", "not_sent", "submitting",
                               "submitted", "ready", "finished"]
    assert h.time.sleeps == [*backoffs(1.0, 2.0), 0.5]


def test_unreachable_host_stops_the_run_after_a_few_tries_of_one_submit() -> None:
    h = Harness(settings=Settings(connect_attempts=2))
    h.api.submits["image 0"].extend([httpx.ConnectError("Connection refused")] * 2)

    outcomes = h.run([make_job(i) for i in range(5)])

    reason = f"cannot reach {BASE}: Connection refused"
    assert [(o.status, o.reason) for o in outcomes] == [("skipped", reason)] * 5
    assert len(h.api.posts()) == 2  # the first submit's two tries; nobody else tried
    assert h.journal.of(0) == ["submitting", "not_sent", "submitting", "not_sent", "finished"]
    assert h.journal.of(1) == ["finished"]


def test_unresolvable_host_says_whether_a_proxy_is_in_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(settings=Settings(connect_attempts=1))
    failure = "Cannot connect to host api.bfl.ai:443 [Name or service not known]"
    h.api.submits["image 0"].append(httpx.ConnectError(failure))

    [outcome] = h.run([make_job(0)])

    assert outcome.reason == (
        f"cannot reach {BASE}: {failure} (no proxy is set: if this network needs "
        "one, set HTTPS_PROXY, and NO_PROXY for the hosts to reach directly)")

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    h = Harness(settings=Settings(connect_attempts=1))
    h.api.submits["image 0"].append(httpx.ConnectError(failure))

    [outcome] = h.run([make_job(0)])

    assert outcome.reason == (f"cannot reach {BASE}: {failure} (through the "
                              "proxy in HTTPS_PROXY; check it)")


def test_a_submit_that_cannot_be_framed_fails_as_not_sent_and_is_not_retried(
        h: Harness) -> None:
    message = "the request cannot be sent as HTTP/1.1: a header holds a forbidden character"
    h.api.submits["image 0"].append(httpx.LocalProtocolError(message))

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == (
        "failed", f"the submit could not be sent: LocalProtocolError: {message}")
    assert len(h.api.posts()) == 1
    assert h.journal.of(0) == ["submitting", "not_sent", "finished"]


@pytest.mark.parametrize(("status", "detail", "reason"), [
    (401, "Not authenticated", "the provider refused the API key (HTTP 401: Not authenticated); "
     "check the key in BFL_API_KEY"),
    (403, "Not authenticated - Invalid Authentication",
     "the provider refused the API key (HTTP 403: Not authenticated - Invalid Authentication); "
     "check the key in BFL_API_KEY"),
    (402, "Insufficient credits", "out of credits (HTTP 402: Insufficient credits)"),
])
def test_account_refusal_of_the_first_submit_stops_the_run_after_one_request(
        status: int, detail: str, reason: str) -> None:
    h = Harness()  # 24 slots: only slow start keeps the others from sending
    h.api.yield_on_submit = True
    h.api.submits["image 0"].append(error(status, detail))

    outcomes = h.run([make_job(i) for i in range(30)])

    assert [(o.status, o.reason) for o in outcomes] == [("skipped", reason)] * 30
    assert len(h.api.posts()) == 1
    assert h.journal.of(0) == ["submitting", "not_sent", "finished"]


def test_first_submit_goes_alone_and_the_rest_follow_once_it_is_accepted() -> None:
    h = Harness()
    h.api.yield_on_submit = True
    accepted_before: list[int] = []

    def count(request: httpx.Request) -> None:
        if request.method == "POST":
            accepted_before.append(len(h.api.tasks))

    h.api.on_request = count

    outcomes = h.run([make_job(i) for i in range(10)])

    assert statuses(outcomes) == ["written"] * 10
    assert accepted_before[0] == 0 and min(accepted_before[1:]) == 1
    assert h.api.peak_posts_before_first_answer == 1


def test_a_refused_first_submit_hands_the_probe_to_the_next(h: Harness) -> None:
    h.api.submits["image 0"].append(httpx.Response(422, json={"detail": "prompt: bad"}))

    outcomes = h.run([make_job(i) for i in range(3)])

    assert statuses(outcomes) == ["failed", "written", "written"]


def test_validation_error_fails_that_job_with_the_detail_and_others_go_on(h: Harness) -> None:
    h.api.submits["image 1"].append(httpx.Response(422, json={"detail": [{
        "loc": ["body", "width"], "msg": "Input should be less than or equal to 1440",
        "type": "less_than_equal"}]}))

    outcomes = h.run([make_job(i) for i in range(3)])

    assert statuses(outcomes) == ["written", "failed", "written"]
    assert outcomes[1].reason == ("rejected: HTTP 422: width: Input should be less than or "
                                  "equal to 1440")
    assert h.journal.of(1) == ["submitting", "not_sent", "finished"]
    assert len(h.api.posts()) == 3


# -- poll and download errors -----------------------------------------------------------------


def test_poll_5xx_is_retried_with_backoff_then_succeeds(h: Harness) -> None:
    h.api.polls["image 0"].extend([error(500, "Internal Server Error"),
                                   httpx.Response(503), httpx.ReadTimeout("timed out")])

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.polls_of("task-1")) == 4
    assert h.time.sleeps == [0.5, *backoffs(1.0, 2.0, 4.0)]
    assert [(e.kind, e.detail) for e in h.events if e.kind == "retry"] == [
        ("retry", "poll: HTTP 500: Internal Server Error"),
        ("retry", "poll: HTTP 503: Service Unavailable"),
        ("retry", "poll: ReadTimeout: timed out"),
    ]
    assert len(h.api.posts()) == 1


def test_poll_failing_every_time_leaves_the_task_pending_for_a_rerun() -> None:
    h = Harness(settings=Settings(get_attempts=3))
    h.api.polls["image 0"].extend([error(500, "Internal Server Error")] * 3)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "pending"
    assert outcome.reason == ("poll failed after 3 attempts: HTTP 500: Internal Server Error; "
                              "the task is recorded and a re-run picks it up")
    assert len(h.api.posts()) == 1


def test_download_5xx_is_retried(h: Harness) -> None:
    h.api.downloads["image 0"].extend([httpx.Response(503), httpx.ReadError("reset")])

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.downloads_made()) == 3
    assert len(h.api.polls_of("task-1")) == 1


def test_expired_sample_url_is_polled_again_once_for_a_fresh_one(h: Harness) -> None:
    h.api.downloads["image 0"].append(httpx.Response(403, text=AZURE_EXPIRED))

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.polls_of("task-1")) == 2
    first, second = h.api.downloads_made()
    assert first.url != second.url
    assert second.url == httpx.URL(f"{DELIVERY}/results/sample.png?task=task-1&sig=4")
    assert len(h.api.posts()) == 1


def test_sample_url_failing_after_a_fresh_poll_leaves_the_paid_task_to_collect(
        h: Harness) -> None:
    h.api.downloads["image 0"].extend([httpx.Response(403, text=AZURE_EXPIRED)] * 2)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "pending"
    assert outcome.reason == ("download failed: HTTP 403: AuthenticationFailed: Server failed "
                              "to authenticate the request. RequestId:1 Time:now" + AGAIN)
    assert h.journal.of(0)[-1] == "finished"  # (finished as pending: stays re-attachable)
    assert len(h.api.polls_of("task-1")) == 2
    assert len(h.api.posts()) == 1


def test_expired_sample_url_with_polls_failing_leaves_the_task_pending() -> None:
    h = Harness(settings=Settings(get_attempts=2))
    h.api.downloads["image 0"].append(httpx.Response(403, text=AZURE_EXPIRED))
    h.api.polls["image 0"].extend([h.api.ready("task-1"), httpx.Response(503),
                                   httpx.Response(503)])

    outcomes = h.run([make_job(0), make_job(1)])

    assert statuses(outcomes) == ["pending", "written"]
    assert outcomes[0].reason == ("poll failed after 2 attempts: HTTP 503: Service Unavailable; "
                                  "the task is recorded and a re-run picks it up")


def test_download_redirect_loop_leaves_only_that_paid_task_to_collect() -> None:
    h = Harness(settings=Settings(get_attempts=1))
    loop = httpx.Response(302, headers={"location": f"{DELIVERY}/loop?task=task-1"})
    h.api.downloads["image 0"].extend([loop] * 100)

    outcomes = h.run([make_job(0), make_job(1)])

    assert statuses(outcomes) == ["pending", "written"]
    assert outcomes[0].reason == ("download failed after 1 attempt: TooManyRedirects: "
                                  "Exceeded maximum allowed redirects" + AGAIN)
    assert len(h.api.posts()) == 2


@pytest.mark.parametrize("where", ["poll", "download"])
def test_a_redirect_to_ftp_is_not_retried(h: Harness, where: str) -> None:
    """Not a transient failure: asking again minutes later gets the same answer. The paid
    task stays in flight, as after any other failed poll or download."""
    ftp = httpx.Response(302, headers={"location": "ftp://files.example/sample.png"})
    (h.api.polls if where == "poll" else h.api.downloads)["image 0"].extend([ftp] * 10)

    outcomes = h.run([make_job(0), make_job(1)])

    problem = "UnsupportedProtocol: redirected to ftp://files.example, which is not http(s)"
    assert [(o.status, o.reason) for o in outcomes] == [
        ("pending", f"poll failed after 1 attempt: {problem}; the task is recorded and a "
         "re-run picks it up") if where == "poll" else
        ("pending", f"download failed: {problem}" + AGAIN), ("written", None)]
    assert not any(event.kind == "retry" for event in h.events)
    assert len(h.api.polls_of("task-1")) == (1 if where == "poll" else 2)  # (+ a fresh URL)
    assert len([q for q in h.api.downloads_made() if q.url.params["task"] == "task-1"]) == (
        0 if where == "poll" else 2)


def test_unusable_sample_url_leaves_only_that_paid_task_to_collect(h: Harness) -> None:
    bad = {"status": "Ready", "result": {"sample": "https://[::1/sample.png", "seed": 1}}
    h.api.polls["image 0"].extend([bad, bad])

    outcomes = h.run([make_job(0), make_job(1)])

    assert statuses(outcomes) == ["pending", "written"]
    assert outcomes[0].reason == ("download: the provider gave an unusable URL (Invalid port: "
                                  "':1')" + AGAIN)
    assert len(h.api.posts()) == 2


def test_poll_refused_with_404_is_not_repeated_and_leaves_the_task_pending(h: Harness) -> None:
    h.api.polls["image 0"].append(error(404, "Not Found"))

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == (
        "pending", "poll failed after 1 attempt: HTTP 404: Not Found; the task is recorded and "
        "a re-run picks it up")
    assert len(h.api.polls_of("task-1")) == 1


def test_key_refused_while_polling_leaves_the_paid_task_pending_and_stops_submits() -> None:
    h = Harness(settings=Settings(account_cap=1))
    h.api.polls["image 0"].append(error(403, "Not authenticated - Invalid Authentication"))

    outcomes = h.run([make_job(0), make_job(1)])

    reason = ("the provider refused the key while polling: HTTP 403: "
              "Not authenticated - Invalid Authentication; check the key in BFL_API_KEY")
    assert [(o.status, o.reason) for o in outcomes] == [("pending", reason), ("skipped", reason)]
    assert len(h.api.posts()) == 1


def test_a_writer_refusal_leaves_only_that_paid_task_to_collect(h: Harness) -> None:
    h.writer.failures[0] = "the provider's image is unusable: WebP is truncated"

    outcomes = h.run([make_job(0), make_job(1)])

    assert [(o.status, o.reason) for o in outcomes] == [
        ("pending", "the provider's image is unusable: WebP is truncated" + AGAIN),
        ("written", None)]


def test_a_full_disk_leaves_the_paid_task_in_flight_and_stops_the_run() -> None:
    h = Harness(settings=Settings(account_cap=1))
    message = "cannot write out/0.png: No space left on device"
    h.writer.faults[0] = LocalFault(message, stops_run=True)

    outcomes = h.run([make_job(i) for i in range(6)])

    assert (outcomes[0].status, outcomes[0].reason) == (
        "pending", f"{message}; the task is recorded and the next run collects it without "
        "paying again")
    # (the next image may be on its way while the first is written; no more after that)
    assert [(o.status, o.reason) for o in outcomes[2:]] == [("skipped", message)] * 4
    assert h.executor is not None and h.executor.fatal == message
    assert len(h.api.posts()) <= 2


def test_a_local_fault_of_one_image_leaves_it_in_flight_and_the_run_goes_on(h: Harness) -> None:
    h.writer.faults[0] = LocalFault("cannot write out/0.png: Is a directory")

    outcomes = h.run([make_job(i) for i in range(2)])

    assert statuses(outcomes) == ["pending", "written"]
    assert h.journal.of(0)[-1] == "finished"  # (finished as pending: stays re-attachable)


@pytest.mark.parametrize("broken", ["submitting", "submitted", "ready"])
def test_a_state_store_that_cannot_record_stops_the_run(broken: str) -> None:
    h = Harness(settings=Settings(account_cap=1))
    h.journal.broken_at = broken

    outcomes = h.run([make_job(i) for i in range(3)])

    reason = "state.sqlite: cannot record in the state store (database or disk is full)"
    assert outcomes[0].reason == reason
    assert [o.status for o in outcomes[1:]] == ["skipped", "skipped"]
    assert h.executor is not None and h.executor.fatal == reason
    assert len(h.api.posts()) == (0 if broken == "submitting" else 1)


def test_a_submit_answered_but_not_recorded_is_unknown_and_stops_the_run() -> None:
    """The outbox sent the submit, but the state store refused its answer (a full disk): the
    task may exist while the ledger says "submitting", so it is unknown (held back by the next
    run, never paid again blindly), and nothing more is submitted."""
    from fluxbatch.outbox import Unrecorded

    h = Harness(settings=Settings(account_cap=1))
    full = ("state.sqlite: cannot record in the state store (database or disk is full). Free "
            "some space or make the folder writable, then run again: what was recorded is "
            "kept, and nothing is paid twice.")
    sent: list[int] = []

    def via(job: Job, account: str | None) -> Callable[[httpx.Request],
                                                       Awaitable[httpx.Response]]:
        async def send(request: httpx.Request) -> httpx.Response:
            sent.append(job.index)
            raise Unrecorded(full)
        return send

    h.submit_via = via

    outcomes = h.run([make_job(i) for i in range(3)])

    assert [(o.status, o.reason) for o in outcomes] == [
        ("unknown", full), ("skipped", full), ("skipped", full)]
    assert h.executor is not None and h.executor.fatal == full
    assert sent == [0]


def test_an_unusable_download_is_fetched_again_from_a_fresh_url_not_paid_again(
        h: Harness) -> None:
    h.writer.unusable[0] = 1

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.posts()) == 1
    assert len(h.api.polls_of("task-1")) == 2  # once to see it Ready, once for a fresh URL
    assert len(h.api.downloads_made()) == 2


def test_a_download_unusable_twice_stays_collectable_for_the_next_run(h: Harness) -> None:
    h.writer.unusable[0] = 2

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == (
        "pending", "the provider's image is unusable: PNG is truncated at byte 10; the next "
        "run downloads it again without paying (or --force pays for a new one)")
    assert len(h.api.posts()) == 1
    assert h.journal.of(0)[-1] == "finished"


# -- where the key goes --------------------------------------------------------------------


@pytest.mark.parametrize(("polling_url", "reason"), [
    ("https://collector.example/v1/get_result?id=task-1",
     "the provider named https://collector.example for this task, which is not bfl's own host; "
     "the API key is not sent there"),
    ("http://api.eu4.bfl.ai/v1/get_result?id=task-1",
     "http://api.eu4.bfl.ai is plain http, which would expose the API key"),
    ("https://bfl.ai.collector.example/v1/get_result?id=task-1",
     "the provider named https://bfl.ai.collector.example for this task, which is not bfl's own "
     "host; the API key is not sent there"),
])
def test_a_polling_url_off_the_providers_hosts_gets_no_key_and_the_task_is_held_as_unknown(
        h: Harness, polling_url: str, reason: str) -> None:
    """The task exists and may be billed: "failed" would make every later run pay again (a
    gateway that misroutes answers the same way each time), so it ends unknown, which the
    next run holds back until --retry-unknown."""
    h.api.submits["image 0"].append(httpx.Response(200, json={
        "id": "task-1", "polling_url": polling_url, "cost": 4.0}))
    h.api.tasks["task-1"] = ("image 0", h.time.now)

    outcomes = h.run([make_job(0), make_job(1)])

    assert [(o.status, o.reason) for o in outcomes] == [
        ("unknown", f"{reason}; the task was created and may have been billed, but cannot be "
         "collected"), ("written", None)]
    assert [q.url.host for q in h.api.requests if q.method == "GET"] == [
        "api.eu4.bfl.ai", "delivery.eu2.bfl.ai"]  # image 1's poll and download only


def test_a_task_id_that_makes_an_unusable_polling_url_is_held_as_unknown_not_failed(
        h: Harness) -> None:
    """The provider created the task (and may bill it), but its polling URL (built from an
    id with a line break, as no polling_url came) cannot be sent: one rule with a polling
    host that may not receive the key. "Failed" would pay for it again at every run."""
    h.api.submits["image 0"].append(httpx.Response(200, json={"id": "task-1\r\nX-Evil: 1",
                                                              "cost": 4.0}))

    outcomes = h.run([make_job(0), make_job(1)])

    assert [(o.status, o.reason) for o in outcomes] == [
        ("unknown", "the provider gave an unusable polling URL (Invalid non-printable ASCII "
         "character in URL, '\\r' at position 42.); the task was created and may have been "
         "billed, but cannot be collected"), ("written", None)]
    assert h.journal.of(0) == ["submitting", "submitted", "finished"]
    assert h.journal.calls[-1] != ("finished", 0, "failed")


def test_polling_urls_on_bfl_clusters_and_the_base_origin_carry_the_key(h: Harness) -> None:
    for index, url in enumerate([f"{BASE}/v1/get_result?id=task-1",
                                 "https://api.us1.bfl.ai/v1/get_result?id=task-2"]):
        h.api.submits[f"image {index}"].append(httpx.Response(200, json={
            "id": f"task-{index + 1}", "polling_url": url}))
        h.api.tasks[f"task-{index + 1}"] = (f"image {index}", h.time.now)

    outcomes = h.run([make_job(0), make_job(1)])

    assert statuses(outcomes) == ["written", "written"]
    polls = [q for q in h.api.requests if q.url.path == "/v1/get_result"]
    assert {q.url.host for q in polls} == {"api.bfl.ai", "api.us1.bfl.ai"}
    assert all(q.headers["x-key"] == KEY for q in polls)


# -- hostile or broken answers -----------------------------------------------------------------


def test_a_deeply_nested_submit_answer_is_unknown_not_a_crash(h: Harness) -> None:
    h.api.submits["image 0"].append(httpx.Response(200, content=b"[" * 100_000))

    outcomes = h.run([make_job(0), make_job(1)])

    assert [(o.status, o.reason) for o in outcomes] == [
        ("unknown", "HTTP 200: the JSON body is nested too deeply to read"), ("written", None)]


def test_a_deeply_nested_poll_answer_is_retried_by_the_next_run(h: Harness) -> None:
    h.api.polls["image 0"].append(httpx.Response(200, content=b"[" * 100_000))

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == (
        "pending", "unreadable poll answer (HTTP 200: the JSON body is nested too deeply to "
        "read); a re-run retries")


@pytest.mark.parametrize(("reply", "reason"), [
    (httpx.Response(422, content=b"\x89PNG\r\n\x1a\n" + bytes(2040),
                    headers={"content-type": "image/png"}),
     "rejected: HTTP 422: (a 2,048-byte image/png body)"),
    (httpx.Response(400, content=bytes(range(256)) * 4),
     "rejected: HTTP 400: (a 1,024-byte binary body)"),
    (httpx.Response(400, json={"detail": "bad \x1b[31mred\x1b[0m\x07 prompt"}),
     "rejected: HTTP 400: bad [31mred [0m prompt"),
])
def test_binary_and_control_characters_in_an_error_never_reach_the_terminal(
        h: Harness, reply: httpx.Response, reason: str) -> None:
    h.api.submits["image 0"].append(reply)

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == ("failed", reason)


def test_a_sample_over_the_size_limit_is_refused_as_it_streams_in() -> None:
    h = Harness(settings=Settings(max_image=1000))
    h.api.downloads["image 0"].append(httpx.Response(200, content=b"x" * 5000))

    outcomes = h.run([make_job(0), make_job(1)])

    assert [(o.status, o.reason) for o in outcomes] == [
        ("pending", "download failed: the image is larger than 1,000 bytes" + AGAIN),
        ("written", None)]
    assert len(h.api.downloads_made()) == 2  # no retry for image 0


def test_a_poll_answer_over_a_mebibyte_is_not_read_whole(h: Harness) -> None:
    h.api.polls["image 0"].extend([httpx.Response(200, content=b" " * (2 << 20))] * 8)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "pending"
    assert outcome.reason == ("poll failed after 8 attempts: BodyTooLarge: the answer is "
                              "larger than 1 MiB; the task is recorded and a re-run picks it up")


# -- rate limits ---------------------------------------------------------------------------


def test_429_with_retry_after_seconds_waits_that_long_then_resubmits(h: Harness) -> None:
    h.api.submits["image 0"].append(error(429, "Too many active tasks", {"retry-after": "7"}))

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.posts()) == 2
    assert h.time.sleeps == [7.0, 0.5]
    assert h.journal.of(0) == ["submitting", "not_sent", "submitting", "submitted", "ready",
                               "finished"]
    assert [(e.kind, e.detail) for e in h.events][:1] == [
        ("rate-limited", "429; retrying in 7.0 s")]


def test_429_with_retry_after_http_date_waits_until_that_time(h: Harness) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    h.api.submits["image 0"].append(error(429, "Too many active tasks", {"retry-after": when}))

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.posts()) == 2
    assert 115 < h.time.sleeps[0] <= 120
    assert h.journal.of(0)[:3] == ["submitting", "not_sent", "submitting"]


def test_429_without_retry_after_backs_off_exponentially_with_jitter(h: Harness) -> None:
    h.api.submits["image 0"].extend([error(429, "Too many active tasks")] * 3)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    assert len(h.api.posts()) == 4
    assert h.time.sleeps == [*backoffs(1.0, 2.0, 4.0), 0.5]
    assert h.journal.of(0)[:7] == ["submitting", "not_sent"] * 3 + ["submitting"]


def test_429s_lower_the_concurrency_and_successes_restore_it() -> None:
    h = Harness(settings=Settings(account_cap=4))
    jobs = [make_job(i) for i in range(16)]
    for job in jobs[:4]:
        h.api.submits[str(job.prompt)].append(error(429, "Too many active tasks"))
    limits: list[int] = []
    prompts: list[str] = []

    def watch(executor: Executor) -> None:
        def on_request(request: httpx.Request) -> None:
            if request.method == "POST":
                limits.append(executor.account.limit)
                prompts.append(_json(request)["prompt"])
        h.api.on_request = on_request

    outcomes = h.run(jobs, started=watch)

    assert statuses(outcomes) == ["written"] * 16
    assert len(h.api.posts()) == 20
    # the 429s: the first submit of each of the first four images
    refused = [i for i, prompt in enumerate(prompts)
               if prompts.index(prompt) == i and prompt in {str(job.prompt) for job in jobs[:4]}]
    last = refused[-1] + 1  # (the limit a POST sees after the last 429)
    assert min(limits[:last + 1]) < 4  # lowered while 429s continue
    assert limits[last:] == sorted(limits[last:])  # and raised again, one step at a time
    assert limits[-1] == 4
    assert h.executor is not None and h.executor.account.limit == 4
    assert [name for name, _, _ in h.journal.calls].count("not_sent") == 4


def test_429s_beyond_the_rate_limit_timeout_give_up_without_paying() -> None:
    h = Harness(settings=Settings(rate_limit_timeout=10.0))
    h.api.submits["image 0"].extend([error(429, "busy", {"retry-after": "6"})] * 5)

    [outcome] = h.run([make_job(0)])

    assert (outcome.status, outcome.reason) == (
        "failed", "still rate-limited (429) after 10 s; gave up")
    assert len(h.api.posts()) == 3
    assert h.journal.of(0) == ["submitting", "not_sent"] * 3 + ["finished"]


def paced(jobs: int, *, cap: int = 8, seconds: float = 2.0) -> tuple[Harness, list[Job]]:
    """A run on virtual time: `jobs` tasks of `seconds` each, fluxbatch allowed `cap`."""
    h = Harness(time=VirtualTime(), settings=Settings(account_cap=cap))
    batch = [make_job(i) for i in range(jobs)]
    for job in batch:
        h.api.durations[str(job.prompt)] = seconds
    return h, batch


def watch_limits(h: Harness, seen: list[tuple[float, int]]) -> Callable[[Executor], None]:
    """Record (time, account limit) at each submit."""
    def started(executor: Executor) -> None:
        def on_request(request: httpx.Request) -> None:
            if request.method == "POST":
                seen.append((h.time.now, executor.account.limit))
        h.api.on_request = on_request
    return started


def test_429s_shed_below_the_cap_are_retried_without_lowering_the_limit() -> None:
    h, jobs = paced(80)
    shed = jobs[5::10]  # one submit in ten, answered 429 although the account has room
    for job in shed:
        h.api.submits[str(job.prompt)].append(error(429, "Too many requests"))
    limits: list[tuple[float, int]] = []

    outcomes = h.run(jobs, started=watch_limits(h, limits))

    assert statuses(outcomes) == ["written"] * 80
    assert len(h.api.posts()) == 88
    assert {limit for _, limit in limits} == {8}
    assert h.api.peak_active == 8
    assert h.time.now < 80 / 8 * 2.0 + 4  # each shed submit waits alone, its slot used


def test_a_hard_cap_below_the_limit_is_learned_and_held() -> None:
    h, jobs = paced(150)
    h.api.cap = 5  # the account allows 5 tasks; fluxbatch was told 8
    limits: list[tuple[float, int]] = []

    outcomes = h.run(jobs, started=watch_limits(h, limits))

    assert statuses(outcomes) == ["written"] * 150
    # The three submits over the cap at the start, then one step up per doubled wait (2, 4,
    # 8... s) in 60 s at the cap. (Cutting to 3/4 of the tasks in flight at each 429 and
    # growing back one slot per "limit" successes made 29.)
    assert len(h.api.refused_at_cap) <= 3 + 6
    assert h.executor is not None and h.executor.account.learned == 5
    learned_at = next(i for i, (_, limit) in enumerate(limits) if limit == 5)
    assert {limit for _, limit in limits[learned_at:]} <= {5, 6}  # 6: a step up, refused
    assert h.time.now < 150 / 5 * 2.0 + 6


def test_a_cap_that_drops_mid_run_is_followed_down_and_held() -> None:
    h, jobs = paced(200)
    h.api.cap = 8

    def drop(executor: Executor) -> None:
        asyncio.get_running_loop().call_at(20.0, setattr, h.api, "cap", 4)

    outcomes = h.run(jobs, started=drop)

    assert statuses(outcomes) == ["written"] * 200
    refused = h.api.refused_at_cap
    assert min(refused) >= 20.0
    assert len([t for t in refused if t < 30.0]) <= 8  # following down: the drop's first 10 s
    assert len([t for t in refused if t >= 30.0]) <= 6  # holding: one 429 per doubled wait
    assert h.executor is not None and h.executor.account.learned == 4


def test_after_a_cut_by_chance_the_limit_grows_back_within_seconds() -> None:
    h, jobs = paced(40, seconds=20.0)
    for job in jobs[10:12]:  # two 429s in a row: the limit is cut, though there is no cap
        h.api.submits[str(job.prompt)].append(error(429, "Too many requests"))
    limits: list[tuple[float, int]] = []

    outcomes = h.run(jobs, started=watch_limits(h, limits))

    assert statuses(outcomes) == ["written"] * 40
    cut = next(i for i, (_, limit) in enumerate(limits) if limit < 8)
    back = next(i for i, (_, limit) in enumerate(limits) if i > cut and limit == 8)
    # Within seconds, though a task takes 20 (growing back one slot per "limit" successes
    # took 100 s here).
    assert limits[back][0] - limits[cut][0] <= 3.0


def test_tasks_attached_from_an_earlier_run_count_toward_the_cap() -> None:
    h, jobs = paced(24)
    h.api.cap = 4
    earlier = {}
    for job in jobs[:4]:  # still rendering at the provider, for 10 s more
        task_id = f"task-old-{job.index}"
        h.api.tasks[task_id] = (str(job.prompt), 0.0)
        h.api.durations[str(job.prompt)] = 10.0
        earlier[job.key] = Submitted(task_id, f"{POLL_BASE}/v1/get_result?id={task_id}", None)
    limits: list[tuple[float, int]] = []

    outcomes = h.run(jobs, attach=earlier, started=watch_limits(h, limits))

    assert statuses(outcomes) == ["written"] * 24
    assert h.executor is not None and h.executor.account.learned == 4
    # The 429s came with the four attached tasks in flight: the cap is 4, not 1.
    assert {limit for at, limit in limits if at >= 10.0} <= {4, 5}


def test_429s_at_the_cap_wait_out_retry_after_before_resubmitting() -> None:
    h, jobs = paced(30)
    h.api.cap = 5
    h.api.cap_headers = {"retry-after": "3"}
    sent: dict[str, list[float]] = defaultdict(list)

    def started(executor: Executor) -> None:
        def on_request(request: httpx.Request) -> None:
            if request.method == "POST":
                sent[str(_json(request)["prompt"])].append(h.time.now)
        h.api.on_request = on_request

    outcomes = h.run(jobs, started=started)

    assert statuses(outcomes) == ["written"] * 30
    assert h.api.refused_at_cap
    retried = [times for times in sent.values() if len(times) > 1]
    assert retried
    for times in retried:
        assert all(later - earlier >= 3.0 for earlier, later in itertools.pairwise(times))


# -- independence and order ----------------------------------------------------------------


def test_one_failure_never_cancels_the_others_and_outcomes_keep_job_order(h: Harness) -> None:
    h.api.polls["image 0"].extend([pending()] * 4)
    h.api.submits["image 1"].append(error(422, "prompt: Field required"))
    h.api.polls["image 3"].append({"status": "Request Moderated"})
    h.api.submits["image 4"].append(httpx.ReadTimeout("timed out"))
    h.writer.failures[5] = "the provider's image is unusable"

    outcomes = h.run([make_job(i) for i in range(7)])

    assert [o.job.index for o in outcomes] == list(range(7))
    assert statuses(outcomes) == ["written", "failed", "written", "moderated", "unknown",
                                  "pending", "written"]
    written_order = [index for index, _, _ in h.writer.written]
    assert sorted(written_order) == [0, 2, 6]
    assert written_order.index(0) > written_order.index(2)  # finished out of order


# -- poll timing -----------------------------------------------------------------------------


def test_with_progress_reported_each_task_is_polled_at_most_three_times() -> None:
    h = Harness(settings=Settings(account_cap=1))
    durations = [2.0, 4.5, 8.0, 9.5, 6.0]
    for index, seconds in enumerate(durations):
        h.api.durations[f"image {index}"] = seconds

    outcomes = h.run([make_job(i) for i in range(len(durations))])

    assert statuses(outcomes) == ["written"] * len(durations)
    polls = [len(h.api.polls_of(o.submitted.task_id)) for o in outcomes if o.submitted]
    assert polls == [2, 2, 2, 2, 2]
    assert all(count <= 3 for count in polls)


def test_without_progress_the_poll_interval_backs_off() -> None:
    h = Harness()
    h.api.report_progress = False
    h.api.durations["image 0"] = 30.0

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "written"
    sleeps = h.time.sleeps
    assert sleeps[0] == 0.5
    for index in range(1, len(sleeps)):
        expected = min(45.0, max(0.1, 0.5 * sum(sleeps[:index])))
        assert sleeps[index] == pytest.approx(expected)
    assert sleeps[1:] == sorted(sleeps[1:])
    assert len(h.api.polls_of("task-1")) == len(sleeps) == 12  # 60 at a fixed 0.5 s


@pytest.mark.parametrize("progress", [None, 0.0, 0.5, 0.99])
def test_a_task_stuck_for_ten_minutes_is_polled_about_thirty_times_at_most(
        progress: float | None) -> None:
    h = Harness(settings=Settings(task_timeout=600.0))
    h.api.polls["image 0"].extend([pending(progress)] * 1000)

    [outcome] = h.run([make_job(0)])

    assert outcome.status == "pending"
    assert outcome.reason is not None and outcome.reason.startswith("still 'Pending' after 6")
    assert len(h.api.polls_of("task-1")) <= 30


def test_progress_that_creeps_is_polled_by_its_rate_not_every_few_milliseconds() -> None:
    h = Harness(settings=Settings(task_timeout=600.0))
    creeping = [pending(0.99 + i * 0.0001) for i in range(1, 99)]
    h.api.polls["image 0"].extend(creeping)

    [outcome] = h.run([make_job(0)])

    assert outcome.status in ("pending", "written")
    assert all(sleep >= 0.02 for sleep in h.time.sleeps)
    assert sum(sleep < 0.1 for sleep in h.time.sleeps) <= 3  # the few aimed polls only
    assert len(h.api.polls_of("task-1")) <= 30


def test_under_the_faults_of_a_real_network_jobs_are_polled_five_times_on_average() -> None:
    """A regional cluster that briefly forgets a live task, servers that fail, progress that
    stalls: each poll answered as the API would, every job still polled ~5 times at most on
    average, none more than ~30 times."""
    not_found = pending(status="Task not found")
    h = Harness(settings=Settings(account_cap=1))  # (one at a time: the fake clock is shared)
    for index in range(24):
        h.api.durations[f"image {index}"] = 5.0
        h.api.polls[f"image {index}"].extend([
            [not_found, pending(0.3), not_found],
            [error(500, "Internal Server Error"), error(503, "Service Unavailable")],
            [pending(0.99)] * 5,
        ][index % 3])

    outcomes = h.run([make_job(i) for i in range(24)])

    assert statuses(outcomes) == ["written"] * 24
    assert len(h.api.posts()) == 24
    polls = [len(h.api.polls_of(o.submitted.task_id)) for o in outcomes if o.submitted]
    assert sum(polls) / len(polls) <= 5, polls
    assert max(polls) <= 30, polls


# -- stopping and re-attaching ---------------------------------------------------------------


def test_stop_skips_unsubmitted_jobs_and_leaves_in_flight_tasks_pending() -> None:
    h = Harness(settings=Settings(account_cap=2))
    for index in range(4):
        h.api.durations[f"image {index}"] = 60.0

    def stop_on_first_poll(executor: Executor) -> None:
        def on_request(request: httpx.Request) -> None:
            if request.url.path == "/v1/get_result":
                executor.stop()
        h.api.on_request = on_request

    outcomes = h.run([make_job(i) for i in range(4)], started=stop_on_first_poll)

    assert statuses(outcomes) == ["pending", "pending", "skipped", "skipped"]
    assert outcomes[0].reason == ("interrupted while waiting for the result; the task is "
                                  "recorded and a re-run picks it up without paying again")
    assert {o.reason for o in outcomes[2:]} <= {"interrupted before it was submitted",
                                                "interrupted before the provider accepted it"}
    assert len(h.api.posts()) == 2
    assert h.api.downloads_made() == []
    assert [o.submitted.task_id for o in outcomes[:2] if o.submitted] == ["task-1", "task-2"]


def test_stop_while_waiting_out_a_429_skips_the_job_without_resubmitting() -> None:
    h = Harness()
    h.api.submits["image 0"].append(error(429, "busy", {"retry-after": "30"}))

    def stop_on_429(executor: Executor) -> None:
        h.api.on_request = lambda request: executor.stop()

    [outcome] = h.run([make_job(0)], started=stop_on_429)

    assert (outcome.status, outcome.reason) == (
        "skipped", "interrupted before the provider accepted it")
    assert len(h.api.posts()) == 1
    assert h.journal.of(0) == ["submitting", "not_sent", "finished"]


def test_stop_while_polls_are_retried_leaves_the_task_pending_at_once() -> None:
    h = Harness()
    h.api.polls["image 0"].extend([error(500, "Internal Server Error")] * 8)

    def stop_on_failed_poll(executor: Executor) -> None:
        def on_request(request: httpx.Request) -> None:
            if request.url.path == "/v1/get_result":
                executor.stop()
        h.api.on_request = on_request

    [outcome] = h.run([make_job(0)], started=stop_on_failed_poll)

    assert (outcome.status, outcome.reason) == (
        "pending", "interrupted while retrying the poll (HTTP 500: Internal Server Error); "
        "the task is recorded and a re-run picks it up")
    assert len(h.api.polls_of("task-1")) == 1
    assert h.time.sleeps == [0.5]  # the backoff was cut short


def test_stop_while_connection_retries_wait_skips_the_job() -> None:
    h = Harness()
    h.api.submits["image 0"].extend([httpx.ConnectError("Connection refused")] * 4)

    def stop_on_submit(executor: Executor) -> None:
        h.api.on_request = lambda request: executor.stop()

    [outcome] = h.run([make_job(0)], started=stop_on_submit)

    assert (outcome.status, outcome.reason) == (
        "skipped", "interrupted before the provider accepted it")
    assert len(h.api.posts()) == 1
    assert h.time.sleeps == []


def test_attached_task_is_polled_where_it_was_and_never_submitted_again(h: Harness) -> None:
    polling_url = f"{POLL_BASE}/v1/get_result?id=task-old"
    h.api.tasks["task-old"] = ("image 0", h.time.now - 30)
    earlier = Submitted("task-old", polling_url, 4.0)

    outcomes = h.run([make_job(0), make_job(1)], attach={"key-0": earlier})

    assert statuses(outcomes) == ["written", "written"]
    assert outcomes[0].submitted == earlier
    assert [str(q.url) for q in h.api.posts()] == [f"{BASE}/v1/flux-pro-1.1"]
    assert _json(h.api.posts()[0])["prompt"] == "image 1"
    assert [str(q.url) for q in h.api.polls_of("task-old")] == [polling_url]
    assert h.journal.of(0) == ["ready", "finished"]


def test_attached_task_is_still_polled_after_stop_and_stays_pending() -> None:
    h = Harness()
    h.api.tasks["task-old"] = ("image 0", h.time.now)
    h.api.durations["image 0"] = 60.0
    earlier = Submitted("task-old", f"{POLL_BASE}/v1/get_result?id=task-old", None)

    outcomes = h.run([make_job(0), make_job(1)], attach={"key-0": earlier},
                     started=lambda executor: executor.stop())

    assert statuses(outcomes) == ["pending", "skipped"]
    assert h.api.posts() == []


def attach_earlier(h: Harness, indices: Iterable[int], *, age: float,
                   duration: float = 0.0) -> dict[str, Submitted]:
    """Tasks of jobs `indices` paid for by an earlier run, `age` seconds ago, each taking
    `duration` seconds at the provider: the `attach` map of a resumed run."""
    attach = {}
    for index in indices:
        task_id = f"task-old-{index}"
        h.api.tasks[task_id] = (f"image {index}", h.time.now - age)
        h.api.durations[f"image {index}"] = duration
        attach[f"key-{index}"] = Submitted(
            task_id, f"{POLL_BASE}/v1/get_result?id={task_id}", 4.0)
    return attach


def first_polls(h: Harness, attach: Mapping[str, Submitted],
                seen: list[tuple[float, httpx.Request]]) -> dict[str, float]:
    """When each attached task was first polled (fake time)."""
    polled: dict[str, float] = {}
    for at, request in seen:
        task_id = request.url.params.get("id")
        if request.url.path == "/v1/get_result" and task_id not in polled:
            polled[str(task_id)] = at
    return {submitted.task_id: polled[submitted.task_id] for submitted in attach.values()}


def test_tasks_paid_by_an_earlier_run_are_polled_at_once_not_behind_new_submits() -> None:
    """A resumed run collects what it paid for first: results expire, and a task collected
    late is paid for again. With -j 2 and 20 new jobs listed first, every one of the 6 tasks
    of the earlier run is polled at the very start, before the second submit is sent (the
    first may go out alongside), and before the slow-start probe, waiting out 429s, is
    accepted."""
    h = Harness(settings=Settings(account_cap=2))
    attach = attach_earlier(h, range(6), age=30.0)
    new = [make_job(i) for i in range(6, 26)]
    h.api.submits["image 6"].extend(error(429, "busy", {"retry-after": "30"}) for _ in range(3))
    seen: list[tuple[float, httpx.Request]] = []
    h.api.on_request = lambda request: seen.append((h.time.now, request))

    outcomes = h.run([*new, *(make_job(i) for i in range(6))], attach=attach)

    assert statuses(outcomes) == ["written"] * 26
    assert set(first_polls(h, attach, seen).values()) == {1000.0}  # before any wait
    posts = [index for index, (_, request) in enumerate(seen) if request.method == "POST"]
    polled = [index for index, (_, request) in enumerate(seen)
              if request.url.params.get("id", "").startswith("task-old-")]
    assert max(polled[:6]) < posts[1]
    assert len(h.api.posts()) == 20 + 3  # (the 429s)
    assert h.writer.written[:6] == [(i, PNG, "image/png") for i in range(6)]


def test_a_task_of_an_earlier_run_still_rendering_holds_its_slot_and_new_submits_wait() -> None:
    """The provider counts a task of the earlier run against the cap while it works on it:
    so does the executor (new submits would only meet 429s), but the task never waits for
    a slot itself, even when there are more of them than the cap."""
    h = Harness(settings=Settings(account_cap=2))
    attach = attach_earlier(h, range(3), age=1.0, duration=11.0)  # 10 s still to go
    active_at_submit: list[int] = []
    seen: list[tuple[float, httpx.Request]] = []

    def count(request: httpx.Request) -> None:
        seen.append((h.time.now, request))
        if request.method == "POST":
            active_at_submit.append(sum(
                1 for prompt, at in h.api.tasks.values()
                if h.time.now - at < h.api.durations.get(prompt, 0.0)))

    h.api.on_request = count

    outcomes = h.run([*(make_job(i) for i in range(3)), *(make_job(i) for i in range(3, 7))],
                     attach=attach)

    assert statuses(outcomes) == ["written"] * 7
    assert set(first_polls(h, attach, seen).values()) == {1000.0}
    assert active_at_submit[0] == 0  # the first submit waited for the earlier tasks to end
    assert max(active_at_submit) <= 2


# -- the body as sent is made when the job's turn comes ---------------------------------------


def test_bodies_are_prepared_only_when_a_slot_is_free_and_a_refused_one_is_not_sent() -> None:
    """Image inputs are read and encoded by `prepare`: a render must hold no more of them
    than it has submits in flight, and an input that cannot be sent fails its job unsent."""
    h = Harness(settings=Settings(account_cap=2))
    alive, peak = [0], [0]

    async def prepare(job: Job) -> Mapping[str, Any]:
        if job.index == 3:
            raise JobFailed("not sent: photos/c.png changed after the plan was made")
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        return {**job.request, "input_image": f"base64-of-{job.index}"}

    def sent(request: httpx.Request) -> None:
        if request.method == "POST":
            alive[0] -= 1

    h.prepare = prepare
    h.api.on_request = sent
    for index in range(6):
        h.api.durations[f"image {index}"] = 3.0
    outcomes = h.run(make_job(i, f"image {i}") for i in range(6))
    by_index = {o.job.index: o for o in outcomes}
    assert [by_index[i].status for i in range(6)] == ["written"] * 3 + ["failed"] + \
        ["written"] * 2
    assert peak[0] <= 2
    assert [_json(q)["input_image"] for q in h.api.posts()] == [
        f"base64-of-{i}" for i in (0, 1, 2, 4, 5)]
    assert h.journal.of(3) == ["finished"]
    assert "changed after the plan was made" in (by_index[3].reason or "")


def test_a_render_cancelled_while_it_waits_leaves_no_task_behind() -> None:
    """`arender`'s task cancelled during a backoff: the executor's own waiters end with it
    (left pending, they are destroyed with the executor and asyncio prints "Task was
    destroyed but it is pending!" on the user's terminal)."""
    async def main() -> set[asyncio.Task[Any]]:
        async def forever(delay: float) -> None:
            await asyncio.Event().wait()

        async with Wire(httpx.MockTransport(lambda request: httpx.Response(500))) as wire:
            executor = Executor(Bfl(providers.REGISTRY["bfl"], BASE, Secret(KEY)), wire,
                                journal=FakeJournal(), writer=FakeWriter(), sleep=forever)
            pausing = asyncio.ensure_future(executor._pause(60))
            await asyncio.sleep(0)
            pausing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pausing
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    assert asyncio.run(main()) == set()


# -- a pool of accounts ---------------------------------------------------------------------------


def pool_of(*caps: int) -> list[PoolAccount]:
    return [PoolAccount(f"acct-{n}", Bfl(providers.REGISTRY["bfl"], BASE, Secret(f"key-{n}")),
                        cap, {}, f"KEY_{n}") for n, cap in enumerate(caps)]


def test_a_pool_renders_in_the_ideal_time_each_account_within_its_cap() -> None:
    h = Harness(time=VirtualTime(), accounts=pool_of(2, 3, 4))
    jobs = [make_job(i) for i in range(45)]
    for job in jobs:
        h.api.durations[str(job.prompt)] = 2.0
    over: list[dict[str | None, int]] = []

    def watch(executor: Executor) -> None:
        def on_request(request: httpx.Request) -> None:
            flying = executor.in_flight()
            if any(flying[lane.name] > lane.cap for lane in executor.lanes):
                over.append(flying)
        h.api.on_request = on_request

    outcomes = h.run(jobs, started=watch)

    assert statuses(outcomes) == ["written"] * 45
    assert over == []
    ideal = 45 / 9 * 2.0
    assert ideal <= h.time.now <= ideal + 1.0  # (the first submits go one by one, per account)
    keys = Counter(request.headers["x-key"] for request in h.api.posts())
    assert keys == {"key-0": 10, "key-1": 15, "key-2": 20}  # each as its cap allows


def test_a_small_render_is_spread_over_the_pool_not_taken_by_its_first_account() -> None:
    h = Harness(time=VirtualTime(), accounts=pool_of(24, 24, 24))
    jobs = [make_job(i) for i in range(12)]

    outcomes = h.run(jobs)

    assert statuses(outcomes) == ["written"] * 12
    assert Counter(request.headers["x-key"] for request in h.api.posts()) == {
        "key-0": 4, "key-1": 4, "key-2": 4}
    polled = {request.url.params["id"]: request.headers["x-key"]
              for request in h.api.requests if request.url.path == "/v1/get_result"}
    submitted = {f"task-{n + 1}": request.headers["x-key"]
                 for n, request in enumerate(h.api.posts())}
    assert polled == submitted  # each task polled with the key that submitted it


def test_a_task_of_an_account_not_in_the_pool_is_never_polled_with_another_key() -> None:
    h = Harness(time=VirtualTime(), accounts=pool_of(24, 24))
    job = make_job(0)
    earlier = Submitted("task-9", f"{POLL_BASE}/v1/get_result?id=task-9", 4.0)

    [outcome] = h.run([job], {job.key: earlier}, started=lambda executor: None)

    assert (outcome.status, outcome.reason) == (
        "pending", "paid through the provider's own key variable, which this run does not "
        "use: only its own key polls it")
    assert h.api.requests == []
