"""The CometAPI gateway: `POST {base}/flux/v1/{model}` with a Bearer key; poll
`{base}/flux/v1/get_result?id=...` (the `polling_url` it returns points at BFL and would need
a BFL key, so it is not used)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from fluxbatch.providers import Polled, ProviderInfo, Secret, Submitted, responses
from fluxbatch.providers.bfl import USER_AGENT


class CometApi:
    def __init__(self, info: ProviderInfo, base_url: str, key: Secret) -> None:
        self.info = info
        self.base_url = base_url.rstrip("/")
        self._key = key

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._key.reveal()}", "accept": "application/json",
                "user-agent": USER_AGENT}

    def submit_request(self, model: str, body: Mapping[str, Any]) -> httpx.Request:
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
