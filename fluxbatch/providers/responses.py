"""Reading provider responses: statuses, results and every error shape, into plain values.

Error bodies come in several shapes (FastAPI `{detail: [...]}` or `{detail: "..."}`,
CometAPI `{error: {message, type, code}}`, plain `{message: ...}`, HTML pages from proxies);
`error_message` turns any of them into one readable line.

Whatever a response holds is untrusted: a body nested too deeply to parse is a bad response
(never a crash), a binary body is summarised, and control characters (terminal escapes) never
reach the user's terminal.
"""

from __future__ import annotations

import html
import json
import os
import re
from enum import StrEnum
from typing import TypeGuard

import httpx

from fluxbatch.providers import Polled, Submitted, credits

READY = "Ready"
PENDING = "Pending"
REQUEST_MODERATED = "Request Moderated"
CONTENT_MODERATED = "Content Moderated"
ERROR = "Error"
TASK_NOT_FOUND = "Task not found"
MODERATED = frozenset({REQUEST_MODERATED, CONTENT_MODERATED})
FAILED = frozenset({ERROR, "Failed"})


class BadResponse(Exception):
    """A 2xx response whose body is not what the protocol promises."""


class SubmitAnswer(StrEnum):
    """What a submit's HTTP answer says about money: the one rule, read by the executor and
    by the outbox (which commits it before the executor hears of it)."""

    ACCEPTED = "accepted"  # 2xx: a task exists, and may be billed
    REFUSED = "refused"  # nothing was created: 4xx (429 included), and a body refused as 500
    MAYBE_BILLED = "maybe-billed"  # 5xx: the task may have been created and billed


def submit_answer(response: httpx.Response) -> SubmitAnswer:
    status = response.status_code
    if response.is_success:
        return SubmitAnswer.ACCEPTED
    if 400 <= status < 500:
        return SubmitAnswer.REFUSED
    if _error_code(response) == "invalid_request":
        return SubmitAnswer.REFUSED  # CometAPI: "500 with error.code invalid_request: fix body"
    return SubmitAnswer.MAYBE_BILLED


def _error_code(response: httpx.Response) -> str | None:
    """CometAPI's `{"error": {"code": ...}}`, if the body has that shape."""
    try:
        body = json_body(response)
    except BadResponse:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def json_body(response: httpx.Response) -> object:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadResponse(f"HTTP {response.status_code}: the body is not JSON: "
                          f"{body_text(response)}") from None
    except RecursionError:
        raise BadResponse(f"HTTP {response.status_code}: the JSON body is nested too deeply "
                          "to read") from None


def read_submitted(response: httpx.Response, *, fallback_poll: str) -> Submitted:
    body = json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
        raise BadResponse(f"the submit response has no task id: {body_text(response)}")
    polling_url = body.get("polling_url")
    if not isinstance(polling_url, str) or not polling_url:
        polling_url = fallback_poll.format(id=body["id"])  # webhook replies may omit it
    return Submitted(body["id"], polling_url, credits(body.get("cost")))


def read_polled(response: httpx.Response) -> Polled:
    body = json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise BadResponse(f"the poll response has no status: {body_text(response)}")
    status = body["status"]
    result: dict[str, object] = body["result"] if isinstance(body.get("result"), dict) else {}
    sample = result.get("sample")
    if not isinstance(sample, str):
        sample = None
    seed = result.get("seed")
    raw_progress = body.get("progress")
    progress = None
    if _is_number(raw_progress) and raw_progress >= 0:
        # The scale is undocumented: read values above 1 as percentages.
        progress = min(1.0, float(raw_progress) / (100.0 if raw_progress > 1 else 1.0))
    details = body.get("details") or (body.get("result") if status != READY else None)
    reported = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return Polled(status, sample, reported, progress, details)


def error_message(response: httpx.Response) -> str:
    """`HTTP 422: width: Input should be less than or equal to 1440` and the like."""
    prefix = f"HTTP {response.status_code}"
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
        body = None
    text = _message_from(body) if body is not None else None
    if text is None:
        binary = _binary(response)
        text = binary or _html_title(response.text) or _snippet(response.text) or \
            response.reason_phrase
    text = _snippet(printable(text), 300)  # one line, whatever the body's layout
    return f"{prefix}: {text}" if text else prefix


def body_text(response: httpx.Response) -> str:
    """A short, printable account of a body: its start, or what kind of bytes it holds."""
    return _binary(response) or _snippet(printable(response.text))


def printable(text: str) -> str:
    """`text` without control characters: a provider's words never drive the terminal."""
    return _CONTROL.sub(" ", text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _binary(response: httpx.Response) -> str | None:
    """`(a 5,120-byte image/png body)` for a body that is not text, else None."""
    content = response.content
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if kind.startswith(("image/", "audio/", "video/", "application/octet-stream")) or \
            b"\x00" in content[:1024]:
        return f"(a {len(content):,}-byte {kind or 'binary'} body)"
    try:
        content[:1024].decode(response.encoding or "utf-8")
    except (UnicodeDecodeError, LookupError):
        return f"(a {len(content):,}-byte {kind or 'binary'} body)"
    return None


def _message_from(body: object) -> str | None:
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):
            return "; ".join(_validation_item(item) for item in detail) or None
        if isinstance(detail, str):
            return detail
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("type") or "error")
            code = error.get("code")
            return f"{message} ({code})" if code else message
        if isinstance(error, str):
            return str(body.get("message") or error)
        if isinstance(body.get("message"), str):
            return str(body["message"])
        return None
    if isinstance(body, str):
        return body
    return None


def _validation_item(item: object) -> str:
    if not isinstance(item, dict):
        return str(item)
    location = [str(part) for part in item.get("loc", []) if part != "body"]
    message = str(item.get("msg", "invalid"))
    return f"{'.'.join(location)}: {message}" if location else message


def _html_title(text: str) -> str | None:
    if "<" not in text[:200]:
        return None
    found = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if found:
        return f"{html.unescape(found.group(1)).strip()} (HTML page)"
    code = re.search(r"<Code>(.*?)</Code>", text)
    if code:
        message = re.search(r"<Message>(.*?)</Message>", text, re.DOTALL)
        return code.group(1) + (f": {message.group(1).strip()}" if message else "")
    stripped = re.sub(r"<[^>]+>", " ", text)
    return _snippet(html.unescape(stripped)) + " (HTML page)"


def _snippet(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe_error(error: httpx.RequestError) -> str:
    """A transport error in one line: `ConnectError: cannot connect to host:443: Connection
    refused`."""
    text = printable(str(error)) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


def unreachable_reason(error: httpx.RequestError) -> str:
    """Why a host could not be reached, for a line that already names the host: `Connection
    refused`, not `ConnectError: cannot connect to 127.0.0.1:9: Connection refused`."""
    text = printable(str(error))
    if text.startswith("cannot connect to ") and ": " in text[len("cannot connect to "):]:
        return text[len("cannot connect to "):].split(": ", 1)[1]
    return text or describe_error(error)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                    "all_proxy")


def network_hint(error: httpx.RequestError) -> str:
    """What to check when a host cannot be reached: the proxy in use, or that none is."""
    proxy = next((name for name in _PROXY_VARIABLES if os.environ.get(name)), None)
    if isinstance(error, httpx.ProxyError) or proxy:
        return f" (through the proxy in {proxy or 'the environment'}; check it)"
    unresolved = any(sign in str(error) for sign in _NAME_NOT_FOUND)
    if unresolved or isinstance(error, httpx.ConnectTimeout):
        return (" (no proxy is set: if this network needs one, set HTTPS_PROXY, and NO_PROXY "
                "for the hosts to reach directly)")
    return ""


_NAME_NOT_FOUND = ("Name or service not known", "name resolution", "nodename nor servname",
                   "getaddrinfo", "No address associated")


def with_details(message: str, details: object) -> str:
    """`message`, plus a task's `details` (moderation reasons, error text) when it has any."""
    if not details:
        return message
    if isinstance(details, dict):
        parts = [f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in details.items()]
        return f"{message} ({_snippet(printable('; '.join(parts)), 300)})"
    return f"{message} ({_snippet(printable(str(details)), 300)})"
