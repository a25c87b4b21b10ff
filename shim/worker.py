"""`make worker`: everything that must happen without a request — retrying failed webhook
events, ending calls their holds no longer cover, releasing expired holds, charging
auto-recharge claims, scheduled reconciliation.
`creditledger worker --once` does one pass of everything due and exits (for cron and tests)."""

import logging
import time
from datetime import datetime, timedelta

from shim.call_control import end_due_calls
from shim.config import Config
from shim.http_errors import require
from shim.queries import QUERIES
from shim.recharge import process_claims
from shim.reconcile import TwilioMessages, VapiCalls, reconcile_stripe, reconcile_twilio, reconcile_vapi
from shim.stripe_client import make_client

log = logging.getLogger(__name__)


DEFAULT_SINCE = {"stripe": timedelta(days=7), "vapi": timedelta(hours=24), "twilio": timedelta(days=7)}


def reconcile_provider(
    pool, config: Config, provider: str, since: timedelta | None = None, resume: bool = False
) -> dict:
    """One reconciliation run against one provider (NotConfigured when its key is missing).
    With resume, the provider's latest failed run is continued over its own window."""
    window_end = None
    since = since or DEFAULT_SINCE[provider]
    if resume:
        with pool.connection() as conn:
            failed = conn.execute(QUERIES["failed_reconciliation_window"], {"provider": provider}).fetchone()
        if failed["window"] is None:
            raise LookupError(f"no failed {provider} reconciliation run to resume")
        window_end = datetime.fromisoformat(failed["window"]["window_end"])
        since = window_end - datetime.fromisoformat(failed["window"]["window_start"])
    if provider == "stripe":
        return reconcile_stripe(pool, make_client(config), since, now=window_end)
    if provider == "twilio":
        messages = TwilioMessages(
            require(config.twilio_account_sid, "TWILIO_ACCOUNT_SID"),
            require(config.twilio_auth_token, "TWILIO_AUTH_TOKEN"),
            config.twilio_api_base,
        )
        return reconcile_twilio(pool, messages, since, now=window_end)
    calls = VapiCalls(config.vapi_api_base, require(config.vapi_api_key, "VAPI_API_KEY"))
    return reconcile_vapi(pool, calls, since, now=window_end)


def reconcile_due(pool, config: Config) -> dict:
    """Run each configured provider's reconciliation when the schedule says it is due."""
    report = {}
    twilio_key = config.twilio_account_sid and config.twilio_auth_token
    for provider, key in (
        ("stripe", config.stripe_api_key),
        ("vapi", config.vapi_api_key),
        ("twilio", twilio_key),
    ):
        if not key:
            report[provider] = "skipped: not configured"
            continue
        with pool.connection() as conn:
            due = conn.execute(QUERIES["reconciliation_due"], {"provider": provider}).fetchone()["due"]
        if due["due"]:
            run = reconcile_provider(
                pool, config, provider, timedelta(seconds=float(due["lookback_seconds"]))
            )
            report[provider] = {k: run[k] for k in ("id", "status", "seen", "recovered", "discrepancies")}
    return report


# Failed events are retried in small transactions, so that wallet locks are held briefly and a
# statement timeout rolls back one batch, not the whole backlog.
RETRY_BATCH = 50
RETRY_MAX_PER_PASS = 500


def retry_webhooks(pool, _config: Config) -> dict:
    """Re-apply due failed events, batch by batch, until none is due or the pass's budget is spent."""
    totals: dict[str, int] = {}
    while sum(totals.values()) < RETRY_MAX_PER_PASS:
        with pool.connection() as conn:
            counts = conn.execute(QUERIES["retry_webhook_events"], {"max_events": RETRY_BATCH}).fetchone()[
                "counts"
            ]
        for status, n in counts.items():
            totals[status] = totals.get(status, 0) + n
        if sum(counts.values()) < RETRY_BATCH:
            break
    return totals


def expire_holds(pool, _config: Config) -> int:
    """Free holds of calls and SMS never reported (an SMS's expiry is also recorded)."""
    with pool.connection() as conn:
        return conn.execute(QUERIES["expire_holds"]).fetchone()["expired"]


def recharges(pool, config: Config):
    """Charge due auto-recharge claims."""
    if not config.stripe_api_key:
        return "skipped: STRIPE_API_KEY is not set"
    return process_claims(pool, make_client(config))


JOBS = {
    "webhooks_retried": retry_webhooks,
    "calls_ended": end_due_calls,
    "holds_expired": expire_holds,
    "recharges": recharges,
    "reconciliation": reconcile_due,
}


def run_once(pool, config: Config) -> dict:
    """One pass of every job. A job that fails (a revoked Stripe key, a provider outage) is
    logged and reported; the jobs after it still run."""
    report = {}
    for name, job in JOBS.items():
        try:
            report[name] = job(pool, config)
        except Exception as exc:  # one job's failure must not starve the others
            log.exception("worker job %s failed", name)
            report[name] = f"error: {type(exc).__name__}: {exc}"
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
