"""Vapi's POST /call, for outbound calls the shim places. Written against the official server
SDK's types rather than through its client: the SDK's first `calls.create` builds pydantic models
for Vapi's whole schema, measured at 10.7 s (17 s on a loaded machine) per process, which every
gunicorn worker would pay on its first outbound call. The request body is the SDK's
CreateCallDto shape (assistantId, phoneNumberId, customer, assistantOverrides); the fake Vapi
validates each one with the SDK's AssistantOverrides and CreateCustomerDto."""

import requests

from shim.config import Config
from shim.http_errors import require

# Short enough that a slow Vapi cannot hold the platform's request; long enough for call setup.
VAPI_TIMEOUT_SECONDS = 10.0


class VapiRefused(Exception):
    """Vapi answered with an error: the call was not created."""

    def __init__(self, status: int, body: str):
        super().__init__(f"Vapi answered {status}: {body[:200]}")
        self.status = status


def create_call(config: Config, body: dict, session: requests.Session | None = None) -> dict:
    """POST /call with Bearer VAPI_API_KEY; the created Call. VapiRefused on an error answer;
    requests.RequestException when Vapi did not answer (the call may exist)."""
    key = require(config.vapi_api_key, "VAPI_API_KEY")
    answer = (session or requests).post(
        f"{config.vapi_api_base.rstrip('/')}/call",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=VAPI_TIMEOUT_SECONDS,
    )
    if not answer.ok:
        raise VapiRefused(answer.status_code, answer.text)
    return answer.json()
