"""Black Forest Labs' own API: `POST {base}/v1/{model}` with `x-key`, then poll exactly the
`polling_url` it returns (regional; never rebuilt), still with `x-key` — as long as that URL
is on BFL's own hosts (or the base URL's origin); anywhere else the key is not sent."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from fluxbatch.providers import (
    Balance,
    KeyNotSent,
    Polled,
    ProviderInfo,
    Secret,
    Submitted,
    credits,
    key_refusal,
    parsed_url,
    responses,
)

USER_AGENT = "fluxbatch"


class Bfl:
    def __init__(self, info: ProviderInfo, base_url: str, key: Secret) -> None:
        self.info = info
        self.base_url = base_url.rstrip("/")
        self._key = key

    def _headers(self) -> dict[str, str]:
        return {"x-key": self._key.reveal(), "accept": "application/json",
                "user-agent": USER_AGENT}

    def submit_request(self, model: str, body: Mapping[str, object]) -> httpx.Request:
        return httpx.Request("POST", parsed_url(f"{self.base_url}/v1/{model}"),
                             json=dict(body), headers=self._headers())

    def poll_request(self, submitted: Submitted) -> httpx.Request:
        url = parsed_url(submitted.polling_url)
        refusal = key_refusal(self.info, self.base_url, url)
        if refusal is not None:
            raise KeyNotSent(refusal)
        return httpx.Request("GET", url, headers=self._headers())

    def read_submitted(self, response: httpx.Response) -> Submitted:
        return responses.read_submitted(
            response, fallback_poll=f"{self.base_url}/v1/get_result?id={{id}}")

    def read_polled(self, response: httpx.Response) -> Polled:
        return responses.read_polled(response)

    def balance_request(self, query_key: Secret | None) -> httpx.Request:
        """`GET {base}/v1/credits`: the base URL's own origin, with the key."""
        return httpx.Request("GET", f"{self.base_url}/v1/credits", headers=self._headers())

    def read_balance(self, response: httpx.Response) -> Balance:
        """`{"credits": 1234.5}`; 1 credit = $0.01."""
        body = responses.json_body(response)
        found = credits(body.get("credits")) if isinstance(body, dict) else None
        if found is None:
            raise responses.BadResponse("the answer has no usable `credits`")
        return Balance(found / 100, found)
