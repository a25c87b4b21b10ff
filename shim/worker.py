"""`make worker`: everything that must happen without a request — retrying failed webhook
events, releasing expired holds, charging auto-recharge claims, scheduled reconciliation.
`creditledger worker --once` does one pass of everything due and exits (for cron and tests)."""

import logging
import time

from shim.config import Config
from shim.queries import QUERIES
from shim.recharge import process_claims
from shim.stripe_client import make_client

log = logging.getLogger(__name__)


def run_once(pool, config: Config) -> dict:
    """One pass of every job; a job whose provider is not configured is skipped and said so."""
    report = {}
    with pool.connection() as conn:
        report["webhooks_retried"] = conn.execute(
            QUERIES["retry_webhook_events"], {"max_events": 500}).fetchone()["counts"]
        report["holds_expired"] = conn.execute(QUERIES["expire_holds"]).fetchone()["expired"]
    if config.stripe_api_key:
        report["recharges"] = process_claims(pool, make_client(config))
    else:
        report["recharges"] = "skipped: STRIPE_API_KEY is not set"
    return report


def run_forever(pool, config: Config, interval_seconds: float = 5.0) -> None:
    """Loop until interrupted; a failing pass is logged and the next one runs on schedule."""
    while True:
        started = time.monotonic()
        try:
            log.info("worker pass: %s", run_once(pool, config))
        except Exception:  # the loop must survive a database restart or a provider outage
            log.exception("worker pass failed")
        time.sleep(max(0.0, interval_seconds - (time.monotonic() - started)))
