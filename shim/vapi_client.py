"""The official Vapi server SDK's client, pointed at VAPI_API_BASE (the fake API in tests and
the demo), with a timeout short enough that a slow Vapi cannot hold a request or a worker pass."""

from vapi import Vapi

from shim.config import Config
from shim.http_errors import require

VAPI_TIMEOUT_SECONDS = 10.0


def make_vapi(config: Config) -> Vapi:
    """A Vapi client for this configuration, or NotConfigured when VAPI_API_KEY is missing."""
    return Vapi(
        token=require(config.vapi_api_key, "VAPI_API_KEY"),
        base_url=config.vapi_api_base.rstrip("/"),
        timeout=VAPI_TIMEOUT_SECONDS,
    )
