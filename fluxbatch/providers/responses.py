"""Reading provider responses: statuses, results and every error shape, into plain values.

Error bodies come in several shapes (FastAPI `{detail: [...]}` or `{detail: "..."}`,
CometAPI `{error: {message, type, code}}`, plain `{message: ...}`, HTML pages from proxies);
`error_message` turns any of them into one readable line.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any, TypeGuard

import httpx

from fluxbatch.providers import Polled, Submitted

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


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadResponse(f"HTTP {response.status_code}: the body is not JSON: "
                          f"{_snippet(response.text)}") from None


def read_submitted(response: httpx.Response, *, fallback_poll: str) -> Submitted:
    body = json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
        raise BadResponse(f"the submit response has no task id: {_snippet(response.text)}")
    polling_url = body.get("polling_url")
    if not isinstance(polling_url, str) or not polling_url:
        polling_url = fallback_poll.format(id=body["id"])  # webhook replies may omit it
    cost = body.get("cost")
    return Submitted(body["id"], polling_url, float(cost) if _is_number(cost) else None)


def read_polled(response: httpx.Response) -> Polled:
    body = json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise BadResponse(f"the poll response has no status: {_snippet(response.text)}")
    status = body["status"]
    result: dict[str, Any] = body["result"] if isinstance(body.get("result"), dict) else {}
    sample = result.get("sample") if isinstance(result.get("sample"), str) else None
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
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = None
    text = _message_from(body) if body is not None else None
    if text is None:
        text = _html_title(response.text) or _snippet(response.text) or response.reason_phrase
    text = " ".join(text.split())  # one line, whatever the body's layout
    return f"{prefix}: {text}" if text else prefix


def _message_from(body: Any) -> str | None:
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


def _validation_item(item: Any) -> str:
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


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe_error(error: httpx.RequestError) -> str:
    """A transport error in one line: `ConnectError: [Errno 111] Connection refused`."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


def with_details(message: str, details: Any) -> str:
    """`message`, plus a task's `details` (moderation reasons, error text) when it has any."""
    if not details:
        return message
    if isinstance(details, dict):
        parts = [f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in details.items()]
        return f"{message} ({'; '.join(parts)})"
    return f"{message} ({details})"
