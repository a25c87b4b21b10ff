"""Regression tests for the cross-transaction gaps G-1 .. G-4 found by the transaction-boundary
audit (docs/transaction-boundaries.md, "Gaps found by the audit, and fixed").

Each test states, in terms of money, what must hold when an operation fails or is retried
between two transactions. Each failed when the audit wrote it; the gaps were fixed in commit
f660bdf, and the tests keep them fixed. Each docstring names the code that was at fault, what
went wrong, and what the code does now. G-1's remainder (a PaymentIntent Stripe accepted but
the worker never recorded, sent again after Stripe pruned its idempotency key) is covered in
tests/test_auto_recharge.py::test_crash_after_stripe_accepted_does_not_charge_twice.
"""

import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from shim.fakes import payloads
from shim.recharge import process_claims
from shim.reconcile import VapiCalls, reconcile_vapi
from tests.db_helpers import as_user, open_wallet, route_assistant
from tests.jwt_tokens import bearer, supabase_token

NOW = datetime.now(UTC)


# ---------------------------------------------------------------------------- auto-recharge


class DelayedNotificationStripe:
    """The part of Stripe's PaymentIntents API the recharge worker uses, for a saved payment
    method with delayed notification (ACH Direct Debit: "It can take up to 4 business days to
    receive acknowledgement of success or failure", docs.stripe.com/payments/ach-direct-debit).

    As documented at docs.stripe.com/api/idempotent_requests: a request with a known
    Idempotency-Key replays the saved answer; keys may be pruned once they are 24 hours old and
    "a new request" is made if a key is reused after that (`prune_keys`)."""

    def __init__(self):
        self.intents: dict[str, SimpleNamespace] = {}
        self.keys: dict[str, str] = {}
        self.created = 0
        self.v1 = SimpleNamespace(payment_intents=self)

    def create(self, params=None, options=None):
        key = (options or {}).get("idempotency_key")
        if key in self.keys:
            return self.intents[self.keys[key]]
        self.created += 1
        intent = SimpleNamespace(
            id=f"pi_delayed_{self.created}",
            object="payment_intent",
            status="processing",
            amount=params["amount"],
            amount_received=0,
            currency=params["currency"],
            customer=params.get("customer"),
            payment_method=params.get("payment_method"),
            metadata=dict(params.get("metadata") or {}),
        )
        self.intents[intent.id] = intent
        if key:
            self.keys[key] = intent.id
        return intent

    def retrieve(self, intent_id, params=None, options=None):
        return self.intents[intent_id]

    def list(self, params=None, options=None):
        return SimpleNamespace(data=list(self.intents.values()), has_more=False)

    def prune_keys(self):
        """24 hours have passed: Stripe no longer remembers the keys."""
        self.keys.clear()


def test_recharge_still_processing_after_its_key_expired_is_not_charged_again(service, db, pool):
    """G-1: shim/recharge.py charge_claim + db/functions/40_recharge.sql api.lease_recharge_claims.

    The worker confirms a claim's off-session PaymentIntent; Stripe answers `processing` (a
    bank debit settles in up to 4 business days). Before the fix charge_claim returned None and
    nothing was recorded: the claim was re-leased every 2 minutes with the same key, and once
    Stripe pruned the key (after 24 hours) the next lease created a second PaymentIntent, so the
    customer was debited twice. Now the PaymentIntent id is recorded on the claim
    (api.mark_recharge_processing) and a claim with one is never leased again; its
    payment_intent.* webhook or Stripe reconciliation settles it. One low balance, one charge."""
    org = open_wallet(service, balance_minor=3_000)
    service.execute(
        "SELECT * FROM api.set_payment_method(%s, 'cus_Delayed01', 'pm_usbankaccount_01')", (org,)
    )
    with as_user(db, org, "owner", commit=True) as conn:
        conn.execute("SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2000::bigint)")
    service.execute("SELECT api.deduct_call_credits(%s, 'call-low', 1800)", (org,))  # 3000 - 2100 = 900
    assert (
        db.execute("SELECT count(*) AS n FROM billing.recharge_claims WHERE status = 'pending'").fetchone()[
            "n"
        ]
        == 1
    )

    stripe = DelayedNotificationStripe()
    process_claims(pool, stripe)  # PaymentIntent confirmed: processing
    db.execute("UPDATE billing.recharge_claims SET leased_until = now() - interval '1 second'")
    process_claims(pool, stripe)  # minutes later: the same key replays
    assert stripe.created == 1

    stripe.prune_keys()  # a day later, the debit still processing
    db.execute("UPDATE billing.recharge_claims SET leased_until = now() - interval '1 second'")
    process_claims(pool, stripe)

    assert stripe.created == 1, (
        f"{stripe.created} PaymentIntents were confirmed for one recharge claim: the worker "
        "re-sent the create after Stripe forgot the idempotency key"
    )
    # Counted as processing (a bank debit takes days), not as a stuck claim.
    metrics = {r["metric"]: r["value"] for r in service.execute("SELECT * FROM api.health_metrics()")}
    assert (metrics["recharge_pending"], metrics["recharge_processing"]) == (0, 1)


# ---------------------------------------------------------------------------- Vapi reconciliation


def test_one_call_that_cannot_be_charged_does_not_stop_reconciling_the_others(service, db, pool, fake_vapi):
    """G-2: shim/reconcile.py reconcile_vapi + db/functions/70_reconciliation.sql
    api.reconcile_vapi_call.

    An ended call that cannot be priced (here a startedAt that is no timestamp; before call
    admission, a metadata org without a wallet) raises inside api.reconcile_vapi_call. Before
    the fix that aborted the whole run, so every call it had not reached yet was never charged,
    for as long as that one call stayed inside the lookback window. Now the error is caught in
    the function, recorded as an `unchargeable` discrepancy, and the run charges the other calls
    and completes."""
    org = open_wallet(service, balance_minor=10_000)
    start = NOW - timedelta(hours=3)
    good = [
        payloads.vapi_call(
            assistant_id=route_assistant(service, org),
            started_at=start + timedelta(minutes=i),
            ended_at=start + timedelta(minutes=i, seconds=60),
        )
        for i in range(3)
    ]
    # Newest first (GET /call sorts by createdAt descending): the orphan is reached first.
    orphan = payloads.vapi_call(
        assistant_id=route_assistant(service, org),
        started_at=NOW - timedelta(minutes=30),
        ended_at=NOW - timedelta(minutes=29),
    )
    orphan["startedAt"] = "the day before yesterday"  # a value the charge cannot price
    fake_vapi.control("calls", [orphan, *good])

    # Today the run raises on the orphan; what matters is what it left uncharged.
    with contextlib.suppress(Exception):
        reconcile_vapi(pool, VapiCalls(fake_vapi.url, "vapi-test-api-key"), timedelta(days=1))

    charged = {
        r["provider_ref"]
        for r in db.execute(
            "SELECT provider_ref FROM billing.ledger_entries WHERE kind = 'call_charge'"
        ).fetchall()
    }
    missing = [c["id"] for c in good if f"vapi:call:{c['id']}" not in charged]
    assert missing == [], f"{len(missing)} ended calls were never charged by reconciliation"
    run = db.execute("SELECT * FROM billing.reconciliation_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert run["status"] == "completed"


# ---------------------------------------------------------------------------- Checkout dedupe


def _top_up(client, org, token, amount, request_id):
    return client.post(
        "/top-ups", json={"amount_minor": amount, "client_request_id": str(request_id)}, headers=bearer(token)
    )


def test_a_deduplicated_request_id_keeps_its_session_when_retried_later(client, service, db, fake_stripe):
    """G-3: db/functions/50_checkout.sql api.begin_checkout (the dedupe-window branch).

    A second tab (request B) asking for the same amount within 60 s is answered with tab A's
    open session. Before the fix nothing recorded that B was given it, so B's retry after the
    window created a second open Checkout Session for the same request, which the customer could
    pay too (P0-7). Now B is recorded in billing.checkout_aliases and begin_checkout looks it up
    there: DESIGN.md's "the same client_request_id always yields the same session while it is
    open" holds, with one Stripe create."""
    org = open_wallet(service)
    token = supabase_token(org)
    request_a, request_b = uuid.uuid4(), uuid.uuid4()
    first = _top_up(client, org, token, 5000, request_a)
    second = _top_up(client, org, token, 5000, request_b)
    assert second.json["session_id"] == first.json["session_id"]

    db.execute("UPDATE billing.checkout_requests SET created_at = now() - interval '2 minutes'")
    retried = _top_up(client, org, token, 5000, request_b)

    assert retried.status_code == 200
    assert retried.json["session_id"] == first.json["session_id"], (
        "a retry of the same client_request_id created another Checkout Session"
    )
    assert fake_stripe.stats()["endpoints"]["POST /v1/checkout/sessions"]["created"] == 1


# ---------------------------------------------------------------------------- Twilio SMS


def test_an_sms_whose_status_callback_never_came_is_not_silently_given_away(service, db):
    """G-4: db/functions/30_holds.sql api.expire_holds (SMS holds).

    A registered SMS holds its cost until the status callback settles it. If that callback is
    lost (Twilio retries a failed connection once by default - "Retry count (rc) ... Default: 1",
    twilio.com/docs/usage/webhooks/webhooks-connection-overrides - so a database outage answered
    503 can drop it), the hold expires after 24 h and is released. Before the fix nothing
    recorded that: the message Twilio bills the platform for was never charged. Now the expiry
    records an open `unsettled_sms` discrepancy (provider twilio) that alerts, for an operator to
    settle from Twilio's record, which Twilio reconciliation now does by itself
    (tests/test_reconciliation_twilio.py); this test accepts either a charge or the open
    discrepancy."""
    org = open_wallet(service, balance_minor=1_000)
    sid = payloads.twilio_sid("SM")
    registered = service.execute("SELECT * FROM api.register_sms(%s, %s, 2)", (org, sid)).fetchone()
    assert registered["status"] == "applied"

    db.execute("UPDATE billing.holds SET expires_at = now() - interval '1 second' WHERE ref = %s", (sid,))
    service.execute("SELECT api.expire_holds()")

    charged = db.execute(
        "SELECT count(*) AS n FROM billing.ledger_entries WHERE provider_ref = %s", (f"twilio:message:{sid}",)
    ).fetchone()["n"]
    recorded = db.execute(
        "SELECT count(*) AS n FROM billing.discrepancies "
        "WHERE provider = 'twilio' AND ref = %s AND status = 'open'",
        (sid,),
    ).fetchone()["n"]
    assert charged + recorded >= 1, (
        "an SMS with no status callback was released at expiry with no charge and no record"
    )
