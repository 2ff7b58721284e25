"""The CometAPI gateway: `POST {base}/flux/v1/{model}` with a Bearer key; poll
`{base}/flux/v1/get_result?id=...` (the `polling_url` it returns points at BFL and would need
a BFL key, so it is not used)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from fluxbatch.providers import (
    Balance,
    Polled,
    ProviderInfo,
    Secret,
    Submitted,
    credits,
    is_loopback,
    parsed_url,
    responses,
)
from fluxbatch.providers.bfl import USER_AGENT

# CometAPI answers its balance query on a host of its own, the key in the query string.
QUOTA_URL = "https://query.cometapi.com/user/quota"
QUOTA_PATH = "/user/quota"


class CometApi:
    def __init__(self, info: ProviderInfo, base_url: str, key: Secret) -> None:
        self.info = info
        self.base_url = base_url.rstrip("/")
        self._key = key

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._key.reveal()}", "accept": "application/json",
                "user-agent": USER_AGENT}

    def submit_request(self, model: str, body: Mapping[str, object]) -> httpx.Request:
        return httpx.Request("POST", f"{self.base_url}/flux/v1/{model}", json=dict(body),
                             headers=self._headers())

    def poll_request(self, submitted: Submitted) -> httpx.Request:
        return httpx.Request("GET", f"{self.base_url}/flux/v1/get_result",
                             params={"id": submitted.task_id}, headers=self._headers())

    def read_submitted(self, response: httpx.Response) -> Submitted:
        submitted = responses.read_submitted(
            response, fallback_poll=f"{self.base_url}/flux/v1/get_result?id={{id}}")
        own = f"{self.base_url}/flux/v1/get_result?id={submitted.task_id}"
        return Submitted(submitted.task_id, own, submitted.cost)

    def read_polled(self, response: httpx.Response) -> Polled:
        return responses.read_polled(response)

    def balance_request(self, query_key: Secret | None) -> httpx.Request | None:
        """`GET https://query.cometapi.com/user/quota?key=...` when the base URL is
        CometAPI's own; the same path on a loopback base URL (the emulator); anywhere else
        (a proxy, another gateway) none: the key is not sent to a host the operator did not
        name. The URL carries the key, so it is never printed, logged or kept."""
        base = parsed_url(self.base_url)
        if is_loopback(base.host):
            url = f"{self.base_url}{QUOTA_PATH}"
        elif base.scheme == "https" and base.host in self.info.hosts:
            url = QUOTA_URL
        else:
            return None
        key = query_key or self._key
        return httpx.Request("GET", url, params={"key": key.reveal()},
                             headers={"accept": "application/json", "user-agent": USER_AGENT})

    def read_balance(self, response: httpx.Response) -> Balance:
        """`{"total_quota": 21.05, ...}`: the account's balance, in USD."""
        body = responses.json_body(response)
        found = credits(body.get("total_quota")) if isinstance(body, dict) else None
        if found is None:
            raise responses.BadResponse("the answer has no usable `total_quota`")
        return Balance(found)
