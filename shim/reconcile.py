"""`creditledger reconcile stripe|vapi|twilio --since ...`: read the provider's own records and
feed every object through the same SQL path as its webhook, so a lost webhook is applied exactly
once and an object already applied is a duplicate. Runs and discrepancies are rows in the
database (billing.reconciliation_runs, billing.discrepancies); an interrupted run resumes from
its cursor. Safe beside live webhooks and beside another reconciliation: every write is keyed."""

import json
import logging
import re
from datetime import UTC, datetime, timedelta

import requests
import stripe
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client as TwilioClient

from shim.bodies import digest_id, field, key
from shim.queries import QUERIES
from shim.retry import RetryableError, with_backoff

log = logging.getLogger(__name__)

# The event types api.ingest_webhook acts on (GET /v1/events accepts up to 20 in `types`).
STRIPE_EVENT_TYPES = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.refund.updated",
    "charge.dispute.created",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    "charge.dispute.closed",
]
# Stripe keeps events for 30 days (https://docs.stripe.com/api/events/list).
STRIPE_EVENTS_MAX_AGE = timedelta(days=30)
STRIPE_PAGE_SIZE = 100
# Vapi's GET /call returns a plain array, at most 1000 calls, and no cursor.
VAPI_PAGE_LIMIT = 1000


def parse_since(text: str) -> timedelta:
    """'7d', '24h', '90m', '30s' -> a timedelta."""
    match = re.fullmatch(r"(\d+)([dhms])", text.strip())
    if not match:
        raise ValueError(f"--since takes a number and a unit (d, h, m, s), not {text!r}")
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match[2]]
    return timedelta(**{unit: int(match[1])})


def start_run(pool, provider: str, window_start: datetime, window_end: datetime) -> dict:
    with pool.connection() as conn:
        return conn.execute(
            "SELECT api.start_reconciliation_run(%s::text, %s::timestamptz, %s::timestamptz) AS run",
            (provider, window_start, window_end),
        ).fetchone()["run"]


def finish_run(pool, run_id: int, error: str | None = None) -> dict:
    with pool.connection() as conn:
        return conn.execute(
            "SELECT api.finish_reconciliation_run(%s::bigint, %s::text, %s::text) AS run",
            (run_id, "failed" if error else "completed", error),
        ).fetchone()["run"]


def run_window(pool, provider: str, window_start: datetime, window_end: datetime, body) -> dict:
    """Start (or resume) a run, do its body, close it as completed or failed."""
    run = start_run(pool, provider, window_start, window_end)
    try:
        body(run["run_id"], run["resume_cursor"])
    except Exception as exc:
        finish_run(pool, run["run_id"], error=f"{type(exc).__name__}: {exc}")
        raise
    return finish_run(pool, run["run_id"])


# ---------------------------------------------------------------------------- Stripe


def _stripe_page(client: stripe.StripeClient, params: dict):
    def fetch():
        try:
            return client.v1.events.list(params=params)
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as exc:
            raise RetryableError(str(exc)) from exc

    return with_backoff(fetch, retryable=(RetryableError,))


def stripe_events(client: stripe.StripeClient, window_start: datetime, window_end: datetime):
    """Every handled event created in the window, newest first, one page at a time, as plain JSON
    read from the response body stripe-python kept (`last_response.body`). Its StripeObjects are
    not fed to SQL: they decode `decimal_string` fields such as
    checkout.session.currency_conversion.fx_rate into Decimal, which no JSON encoder writes."""
    params = {
        "types": STRIPE_EVENT_TYPES,
        "limit": STRIPE_PAGE_SIZE,
        "created": {"gte": int(window_start.timestamp()), "lte": int(window_end.timestamp())},
    }
    while True:
        page = _stripe_page(client, params)
        yield from json.loads(page.last_response.body)["data"]
        if not page.has_more or not page.data:
            return
        params = params | {"starting_after": page.data[-1].id}


def payment_intent_of(event) -> str | None:
    """The PaymentIntent a payment event credits (phantom detection compares these); None for
    anything else, whatever its shape."""
    obj, event_type = field(field(event, "data"), "object"), key(field(event, "type")) or ""
    if event_type.startswith("checkout.session."):
        return key(field(obj, "payment_intent")) or key(field(obj, "id"))
    if event_type == "payment_intent.succeeded":
        return key(field(obj, "id"))
    return None


def reconcile_object(conn, run_id: int, provider: str, obj, ref: str | None = None) -> dict:
    """Feed one provider object (decoded JSON) to api.reconcile_object as JSON text: applied, or
    recorded as unreadable under `ref` (default: its id, else a digest) while the run goes on.
    The text keeps what PostgreSQL refuses (a NUL, a lone surrogate, NaN) for SQL to judge."""
    text = json.dumps(obj)
    ref = ref or key(field(obj, "id")) or digest_id(provider, text)
    return conn.execute(
        QUERIES["reconcile_object"], {"run_id": run_id, "provider": provider, "ref": ref, "object": text}
    ).fetchone()["result"]


def reconcile_stripe(
    pool, client: stripe.StripeClient, since: timedelta, now: datetime | None = None
) -> dict:
    """Feed Stripe's events of the window through the webhook path; then report phantoms."""
    window_end = now or datetime.now(UTC)
    window_start = window_end - min(since, STRIPE_EVENTS_MAX_AGE)

    def body(run_id: int, resume_cursor):
        # Newest first: a resumed run skips what is newer than where it stopped.
        end = min(window_end, datetime.fromisoformat(resume_cursor)) if resume_cursor else window_end
        known = set()
        with pool.connection() as conn:
            for event in stripe_events(client, window_start, end):
                reconcile_object(conn, run_id, "stripe", event)
                if intent := payment_intent_of(event):
                    known.add(intent)
            if not resume_cursor:  # a resumed run saw only part of the window: no phantom verdicts
                conn.execute(
                    "SELECT api.record_stripe_phantoms(%s::bigint, %s::text[])", (run_id, sorted(known))
                )

    return run_window(pool, "stripe", window_start, window_end, body)


# ---------------------------------------------------------------------------- Vapi


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VapiCalls:
    """GET /call with Bearer auth, retried on 429 and 5xx."""

    def __init__(self, base_url: str, api_key: str, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    def page(self, updated_after: datetime, updated_before: datetime, limit: int = VAPI_PAGE_LIMIT) -> list:
        def fetch():
            answer = self.session.get(
                f"{self.base_url}/call",
                timeout=30,
                params={
                    "updatedAtGt": _iso(updated_after),
                    "updatedAtLt": _iso(updated_before),
                    "limit": limit,
                },
            )
            if answer.status_code == 429 or answer.status_code >= 500:
                retry_after = answer.headers.get("Retry-After")
                raise RetryableError(
                    f"GET /call answered {answer.status_code}", float(retry_after) if retry_after else None
                )
            answer.raise_for_status()
            return answer.json()

        return with_backoff(fetch, retryable=(RetryableError, requests.ConnectionError))

    def in_window(self, start: datetime, end: datetime, limit: int = VAPI_PAGE_LIMIT):
        """Every call updated in (start, end): a full page means there may be more, so the
        window is split in two and each half paged (there is no cursor to follow)."""
        calls = self.page(start, end, limit)
        if len(calls) < limit or end - start <= timedelta(milliseconds=2):
            yield from calls
            return
        middle = start + (end - start) / 2
        yield from self.in_window(start, middle + timedelta(milliseconds=1), limit)
        yield from self.in_window(middle, end, limit)


def reconcile_vapi(
    pool, calls: VapiCalls, since: timedelta, now: datetime | None = None, limit: int = VAPI_PAGE_LIMIT
) -> dict:
    """Charge every ended call in the window that the ledger lacks; record mismatches and
    calls that cannot be attributed to an org."""
    window_end = now or datetime.now(UTC)
    window_start = window_end - since

    def body(run_id: int, resume_cursor):
        seen = set()
        with pool.connection() as conn:
            for call in calls.in_window(window_start, window_end, limit):
                ref = key(field(call, "id")) or digest_id("call", json.dumps(call))
                if ref in seen:  # split windows overlap by a millisecond
                    continue
                seen.add(ref)
                reconcile_object(conn, run_id, "vapi", call, ref)

    return run_window(pool, "vapi", window_start, window_end, body)


# ---------------------------------------------------------------------------- Twilio

# The Message resource fields the ledger keeps as evidence (dates as ISO-8601).
_TWILIO_FIELDS = (
    "sid",
    "status",
    "error_code",
    "error_message",
    "account_sid",
    "to",
    "num_segments",
    "price",
    "price_unit",
    "api_version",
    "messaging_service_sid",
    "date_sent",
    "date_updated",
)


class TwilioMessages:
    """GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json through the official SDK,
    retried on 429 and 5xx."""

    def __init__(self, account_sid: str, auth_token: str, api_base: str | None = None):
        self.client = TwilioClient(account_sid, auth_token, http_client=TwilioHttpClient(timeout=30))
        if api_base:
            # twilio-python builds every URL of a domain from its `base_url`
            # (twilio/base/domain.py Domain.absolute_url; twilio/rest/api/ApiBase.py sets
            # "https://api.twilio.com"), so this points client.messages(...) at another server.
            self.client.api.base_url = api_base

    def fetch(self, sid: str) -> dict:
        """The message as a JSON object, or Twilio's error (code 20404) when it has none."""

        def fetch():
            try:
                return self.client.messages(sid).fetch()
            except TwilioRestException as exc:
                if exc.status == 429 or exc.status >= 500:
                    raise RetryableError(f"GET message {sid} answered {exc.status}") from exc
                raise

        try:
            message = with_backoff(fetch, retryable=(RetryableError, requests.ConnectionError))
        except TwilioRestException as exc:
            if exc.status != 404:
                raise
            return {"code": exc.code, "status": exc.status, "message": exc.msg}
        record = {name: getattr(message, name) for name in _TWILIO_FIELDS}
        record["from"] = message.from_
        for name in ("date_sent", "date_updated"):
            record[name] = record[name] and record[name].isoformat()
        return record


def reconcile_twilio(pool, messages: TwilioMessages, since: timedelta, now: datetime | None = None) -> dict:
    """Ask Twilio about every SMS registered in the window whose status callback is overdue or
    never came, and apply what Twilio says through the callback's SQL path."""
    window_end = now or datetime.now(UTC)
    window_start = window_end - since

    def body(run_id: int, _resume_cursor):
        with pool.connection() as conn:
            candidates = conn.execute(QUERIES["twilio_reconciliation_candidates"], {"run_id": run_id})
            for sid in [row["message_sid"] for row in candidates.fetchall()]:
                reconcile_object(conn, run_id, "twilio", messages.fetch(sid), sid)

    return run_window(pool, "twilio", window_start, window_end, body)
