"""Ending calls through Vapi's Live Call Control: `POST {call.monitor.controlUrl}` with
`{"type": "end-call"}` (Live Call Control, https://docs.vapi.ai/calls/call-features).
SQL decides which calls to end and leases each to one sender (api.lease_call_ends); this module
only sends the request and records the answer, so a call is ended once whether the webhook that
refused it or the worker gets there first."""

import logging
from urllib.parse import urlsplit

import requests

from shim.config import Config
from shim.queries import QUERIES

log = logging.getLogger(__name__)

# A control URL answers at once; a slow one must not hold a webhook answer or the worker's pass.
END_CALL_TIMEOUT_SECONDS = 3.0
LEASE_BATCH = 20


def trusted_control_url(url: str, config: Config) -> bool:
    """Only Vapi's own hosts receive requests: the URL comes from a signed message, but a
    request to any host it names would make this service a proxy for whoever can sign."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme in ("https", "http") and any(
        host == allowed or host.endswith("." + allowed) for allowed in config.vapi_control_hosts
    )


def send_end_call(url: str, config: Config, session: requests.Session) -> tuple[bool, str | None]:
    """One end-call request: (ended, error). A call the control URL no longer knows (404, 410)
    has already ended."""
    if not trusted_control_url(url, config):
        return False, f"control URL host is not one of VAPI_CONTROL_HOSTS: {urlsplit(url).hostname}"
    try:
        answer = session.post(url, json={"type": "end-call"}, timeout=END_CALL_TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if answer.ok:
        return True, None
    if answer.status_code in (404, 410):
        return True, f"control URL answered {answer.status_code}: the call had already ended"
    return False, f"control URL answered {answer.status_code}"


def end_due_calls(pool, config: Config, only_call_id: str | None = None, session=None) -> dict:
    """End every call SQL says must end now (or just `only_call_id`); counts by outcome."""
    session = session or requests.Session()
    counts: dict[str, int] = {}
    with pool.connection() as conn:
        leases = conn.execute(
            QUERIES["lease_call_ends"], {"max_calls": LEASE_BATCH, "only_call_id": only_call_id}
        ).fetchall()
    for lease in leases:
        ended, error = send_end_call(lease["control_url"], config, session)
        if error:
            log.warning("ending call %s: %s", lease["call_id"], error)
        with pool.connection() as conn:
            state = conn.execute(
                QUERIES["record_call_end"], {"call_id": lease["call_id"], "ended": ended, "error": error}
            ).fetchone()["state"]
        counts[state] = counts.get(state, 0) + 1
    return counts
