"""Reconciliation: what lost webhooks missed is applied exactly once, and what does not add up
is recorded."""

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from shim.fakes import payloads
from shim.reconcile import VapiCalls, reconcile_stripe, reconcile_vapi
from shim.retry import RetryableError
from shim.stripe_client import make_client
from tests.db_helpers import ledger_count, open_wallet, route_assistant, wallet
from tests.jwt_tokens import supabase_token
from tests.senders import post_vapi

NOW = datetime.now(UTC)


@pytest.fixture
def vapi_calls(fake_vapi):
    return VapiCalls(fake_vapi.url, "vapi-test-api-key")


def pay(client, fake_stripe, org, amount):
    """A customer pays a top-up through Checkout (its events delivered or not, per the fake)."""
    answer = client.post(
        "/top-ups",
        json={"amount_minor": amount, "client_request_id": str(uuid.uuid4())},
        headers={"Authorization": f"Bearer {supabase_token(org)}"},
    )
    return fake_stripe.control(f"complete_session/{answer.json['session_id']}")


def ended_calls(service, org, n, start=NOW - timedelta(hours=2), seconds=60):
    assistant_id = route_assistant(service, org)
    return [
        payloads.vapi_call(
            assistant_id=assistant_id,
            started_at=start + timedelta(seconds=i * 3),
            ended_at=start + timedelta(seconds=i * 3 + seconds),
            updated_at=start + timedelta(seconds=i * 3 + seconds + 1),
        )
        for i in range(n)
    ]


def test_a_day_with_a_fifth_of_webhooks_dropped_is_made_whole(
    client, service, db, stripe_delivers, shim_config, pool, fake_vapi, vapi_calls
):
    orgs = [open_wallet(service, balance_minor=100_000) for _ in range(3)]
    stripe_delivers.control("webhooks", {"drop_ratio": 0.2, "seed": 7})
    for i in range(15):
        pay(client, stripe_delivers, orgs[i % 3], 1000 + i)

    calls = [c for org in orgs for c in ended_calls(service, org, 10)]
    fake_vapi.control("calls", calls)
    rng = random.Random(7)
    for call in calls:
        if rng.random() >= 0.2:
            post_vapi(client, payloads.vapi_end_of_call_report(call))

    stripe_run = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1))
    vapi_run = reconcile_vapi(pool, vapi_calls, timedelta(days=1))
    assert stripe_run["status"] == vapi_run["status"] == "completed"
    assert stripe_run["recovered"] >= 1 and vapi_run["recovered"] >= 1

    top_ups = db.execute(
        "SELECT count(*) AS n, sum(amount_minor) AS total FROM billing.ledger_entries "
        "WHERE kind = 'top_up' AND source = 'stripe'"
    ).fetchone()
    assert top_ups["n"] == 15 and top_ups["total"] == sum(1000 + i for i in range(15))
    charges = db.execute(
        "SELECT count(*) AS n FROM billing.ledger_entries WHERE kind = 'call_charge'"
    ).fetchone()
    assert charges["n"] == 30
    for org in orgs:  # 10 one-minute calls of 70 each
        expected_topups = sum(1000 + i for i in range(15) if i % 3 == orgs.index(org))
        assert wallet(db, org)["balance_minor"] == 100_000 + expected_topups - 10 * 70

    again = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1))
    again_vapi = reconcile_vapi(pool, vapi_calls, timedelta(days=1))
    assert again["recovered"] == 0 and again_vapi["recovered"] == 0
    assert again["already_applied"] == again["seen"]


def test_reconciliation_racing_live_webhooks_credits_once(
    client, service, db, stripe_delivers, shim_config, pool
):
    org = open_wallet(service)
    stripe_delivers.control("webhooks", {"deliver": False})
    for i in range(20):
        pay(client, stripe_delivers, org, 1000 + i)
    redelivered = []

    def webhooks_come_back():
        stripe_delivers.control("webhooks", {"deliver": True})
        redelivered.extend(stripe_delivers.control("redeliver", {})["event_ids"])

    redelivery = threading.Thread(target=webhooks_come_back)
    redelivery.start()
    runs = [
        threading.Thread(target=reconcile_stripe, args=(pool, make_client(shim_config), timedelta(days=1)))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for thread in [redelivery, *runs]:
        thread.join(60)
    assert not redelivery.is_alive() and len(redelivered) == 40  # each payment's two events raced
    assert ledger_count(db, org) == 20
    assert wallet(db, org)["balance_minor"] == sum(1000 + i for i in range(20))


def test_phantom_credit_is_reported(client, service, db, fake_stripe, shim_config, pool):
    org = open_wallet(service)
    service.execute(
        "SELECT api.add_wallet_credits(%s, 5000, 'forged', 'top_up', 'stripe', "
        "'stripe:payment_intent:pi_NeverHappened')",
        (org,),
    )
    run = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1))
    assert run["discrepancies"] == 1
    found = db.execute("SELECT * FROM billing.discrepancies").fetchone()
    assert (found["kind"], found["ref"], found["status"]) == ("phantom", "pi_NeverHappened", "open")
    resolved = service.execute(
        "SELECT api.resolve_discrepancy(%s, 'reversed by adjustment #1') AS d", (found["id"],)
    ).fetchone()["d"]
    assert resolved["status"] == "resolved"


def test_duration_mismatch_and_unattributed_calls_are_reported(
    client, service, db, pool, fake_vapi, vapi_calls
):
    org = open_wallet(service, balance_minor=10_000)
    (call,) = ended_calls(service, org, 1, seconds=60)
    report = payloads.vapi_end_of_call_report(
        call, started_at=NOW - timedelta(hours=2), ended_at=NOW - timedelta(hours=2) + timedelta(seconds=30)
    )
    post_vapi(client, report)  # the webhook said 30 s; Vapi's record says 60 s
    stray = payloads.vapi_call(
        started_at=NOW - timedelta(hours=1),
        ended_at=NOW - timedelta(minutes=59),
        updated_at=NOW - timedelta(minutes=58),
        assistant_id="asst-unknown",
    )
    fake_vapi.control("calls", [call, stray])
    run = reconcile_vapi(pool, vapi_calls, timedelta(days=1))
    kinds = sorted(d["kind"] for d in db.execute("SELECT kind FROM billing.discrepancies").fetchall())
    assert kinds == ["duration_mismatch", "unattributed"]
    assert run["discrepancies"] == 1  # the mismatch is recorded by the charge itself, without a run id
    assert wallet(db, org)["balance_minor"] == 10_000 - 35


def test_window_of_2500_calls_is_paged_completely(service, db, pool, fake_vapi, vapi_calls):
    org = open_wallet(service, balance_minor=1_000_000)
    start = NOW - timedelta(hours=20)
    calls = [
        payloads.vapi_call(
            assistant_id=route_assistant(service, org),
            started_at=start + timedelta(seconds=i * 10),
            ended_at=start + timedelta(seconds=i * 10 + 6),
            updated_at=start + timedelta(seconds=i * 10 + 7),
        )
        for i in range(2500)
    ]
    fake_vapi.control("calls", calls)
    run = reconcile_vapi(pool, vapi_calls, timedelta(days=1))
    assert run["recovered"] == 2500
    assert ledger_count(db, org) == 2501
    limits = {q.get("limit") for q in fake_vapi.stats()["queries"]}
    assert limits == {"1000"}


def test_429_answers_are_retried_and_the_run_completes(
    client, service, db, pool, fake_vapi, vapi_calls, fake_stripe, shim_config
):
    org = open_wallet(service, balance_minor=10_000)
    fake_vapi.control("calls", ended_calls(service, org, 3))
    fake_vapi.control("fail", {"count": 2, "status": 429})
    assert reconcile_vapi(pool, vapi_calls, timedelta(days=1))["recovered"] == 3

    pay(client, fake_stripe, org, 2000)
    fake_stripe.control("fail", {"count": 2, "status": 429, "path_prefix": "/v1/events"})
    run = reconcile_stripe(pool, make_client(shim_config, max_network_retries=0), timedelta(days=1))
    assert run["status"] == "completed" and run["recovered"] == 1


def test_interrupted_run_resumes_from_its_cursor(
    client, service, db, fake_stripe, shim_config, pool, monkeypatch
):
    """A run that dies after its first page is resumed, over the same window, from the cursor
    of the last event it applied; what it had applied stays applied exactly once."""
    import shim.reconcile as reconcile

    org = open_wallet(service)
    for i in range(5):
        pay(client, fake_stripe, org, 1000 + i)
    monkeypatch.setattr(reconcile, "STRIPE_PAGE_SIZE", 2)
    real_page, pages = reconcile._stripe_page, []

    def dies_on_second_page(client, params):
        pages.append(params)
        if len(pages) == 2:
            raise ConnectionError("worker killed")
        return real_page(client, params)

    monkeypatch.setattr(reconcile, "_stripe_page", dies_on_second_page)
    window_end = datetime.now(UTC)
    with pytest.raises(ConnectionError):
        reconcile_stripe(pool, make_client(shim_config), timedelta(days=1), now=window_end)
    failed = db.execute("SELECT * FROM billing.reconciliation_runs").fetchone()
    assert failed["status"] == "failed" and failed["seen"] == 2 and failed["resume_cursor"] is not None

    resumed = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1), now=window_end)
    assert resumed["id"] == failed["id"] and resumed["status"] == "completed"
    assert pages[2]["created"]["lte"] == int(failed["resume_cursor"].timestamp())
    assert ledger_count(db, org) == 5
    assert wallet(db, org)["balance_minor"] == sum(1000 + i for i in range(5))


def test_cli_resume_continues_the_failed_window(
    client, service, db, fake_stripe, shim_config, pool, monkeypatch
):
    """`creditledger reconcile stripe --resume` picks the failed run's own window, whatever now is."""
    from shim.worker import reconcile_provider

    org = open_wallet(service)
    pay(client, fake_stripe, org, 1500)
    fake_stripe.control("fail", {"count": 5, "status": 500, "path_prefix": "/v1/events"})
    window_end = datetime.now(UTC) + timedelta(minutes=1)  # not 'now': the resume must reuse it
    with pytest.raises(RetryableError):  # five 500s: the bounded backoff gives up
        reconcile_stripe(
            pool, make_client(shim_config, max_network_retries=0), timedelta(days=2), now=window_end
        )
    failed = db.execute("SELECT * FROM billing.reconciliation_runs").fetchone()
    resumed = reconcile_provider(pool, shim_config, "stripe", resume=True)
    assert resumed["id"] == failed["id"] and resumed["status"] == "completed"
    # Compared as instants: PostgreSQL's JSON drops trailing zeros of the microseconds.
    assert datetime.fromisoformat(resumed["window_end"]) == failed["window_end"]
    assert ledger_count(db, org) == 1


def test_failed_runs_are_retried_after_ten_minutes_not_every_pass(service, db):
    due = lambda: service.execute("SELECT api.reconciliation_due('vapi') AS d").fetchone()["d"]["due"]  # noqa: E731
    assert due()
    db.execute(
        "INSERT INTO billing.reconciliation_runs (provider, window_start, window_end, status) "
        "VALUES ('vapi', now() - interval '1 day', now(), 'failed')"
    )
    assert not due()
    db.execute("UPDATE billing.reconciliation_runs SET started_at = now() - interval '11 minutes'")
    assert due()


def test_events_waiting_in_the_inbox_are_not_counted_as_applied(
    client, service, db, fake_stripe, shim_config, pool
):
    """A payment whose event is stored 'failed' (no wallet yet) is not 'already applied'."""
    from tests.senders import paid_checkout, stripe_event

    session, _ = paid_checkout(uuid.uuid4(), 2500)
    event = stripe_event("checkout.session.completed", session)
    fake_stripe.control("insert_event", {"type": event["type"], "data": event["data"], "id": event["id"]})
    from tests.senders import post_stripe

    assert post_stripe(client, event).json["status"] == "failed"
    run = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1))
    assert run["seen"] == 1 and run["already_applied"] == 0 and run["recovered"] == 0


def test_a_run_killed_without_finishing_is_failed_by_the_next_start_and_resumes(service, db):
    """F-13: a run whose process was killed stays 'running'; once it has made no progress for
    reconcile_stall (15 min), the provider's next start fails it, so --resume continues it."""

    def start(window_start, window_end):
        return service.execute(
            "SELECT api.start_reconciliation_run('stripe', %s, %s) AS r", (window_start, window_end)
        ).fetchone()["r"]

    killed_window = (NOW - timedelta(days=7), NOW - timedelta(hours=1))
    killed = start(*killed_window)["run_id"]
    busy = service.execute(
        "SELECT api.start_reconciliation_run('vapi', %s, %s) AS r", (NOW - timedelta(days=1), NOW)
    ).fetchone()["r"]["run_id"]
    db.execute("UPDATE billing.reconciliation_runs SET progressed_at = now() - interval '16 minutes'")
    db.execute(
        "UPDATE billing.reconciliation_runs SET progressed_at = now() - interval '5 minutes' WHERE id = %s",
        (busy,),
    )  # slow but alive: left alone

    start(NOW - timedelta(days=7), NOW)
    runs = {r["id"]: r for r in db.execute("SELECT * FROM billing.reconciliation_runs")}
    assert runs[killed]["status"] == "failed" and runs[killed]["error"].startswith("abandoned: no progress")
    assert runs[busy]["status"] == "running"  # another provider, and not stalled anyway

    window = service.execute("SELECT api.failed_reconciliation_window('stripe') AS w").fetchone()["w"]
    assert window["run_id"] == killed
    resumed = start(*killed_window)
    assert resumed["run_id"] == killed
    row = db.execute(
        "SELECT status, error FROM billing.reconciliation_runs WHERE id = %s", (killed,)
    ).fetchone()
    assert (row["status"], row["error"]) == ("running", None)


# ---------------------------------------------------------------------------- poison objects

POISONS = {
    "nul": "Ana\x00Lopez",  # PostgreSQL: 22P05, unsupported Unicode escape sequence
    "lone_surrogate": "Ana \ud800",  # 22P02 (providers' APIs never send NaN: JSON has none)
}


def unreadable(db, provider):
    return db.execute(
        "SELECT * FROM billing.discrepancies WHERE provider = %s AND kind = 'unreadable'", (provider,)
    ).fetchall()


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
def test_a_poison_call_mid_page_is_recorded_and_the_calls_behind_it_are_charged(
    service, db, pool, fake_vapi, vapi_calls, poison
):
    org = open_wallet(service, balance_minor=10_000)
    calls = ended_calls(service, org, 3)
    calls[1]["customer"]["name"] = POISONS[poison]  # a caller's name, as Vapi records it
    fake_vapi.control("calls", calls)

    for attempt in range(2):  # the same poison again next run: counted again, still not blocking
        run = reconcile_vapi(pool, vapi_calls, timedelta(days=1))
        assert run["status"] == "completed" and run["seen"] == 3 and run["unreadable"] == 1
        assert run["recovered"] == (2 if attempt == 0 else 0)
        (found,) = unreadable(db, "vapi")
        assert found["ref"] == calls[1]["id"] and found["status"] == "open"
        assert found["evidence"]["error"].startswith("22P0")
        assert calls[1]["id"] in found["evidence"]["object"]
    charged = {e["provider_ref"] for e in db.execute("SELECT provider_ref FROM billing.ledger_entries")}
    assert {f"vapi:call:{c['id']}" for c in calls} - charged == {f"vapi:call:{calls[1]['id']}"}
    assert wallet(db, org)["balance_minor"] == 10_000 - 2 * 70


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
def test_a_poison_event_mid_page_is_recorded_and_the_payments_behind_it_are_credited(
    service, db, pool, fake_stripe, shim_config, poison
):
    from tests.senders import paid_checkout

    org = open_wallet(service)
    created = int(datetime.now(UTC).timestamp())
    events = []
    for i in range(3):  # listed newest first: the poison is the second event of the page
        session, _ = paid_checkout(org, 1000 + i)
        if i == 1:
            session["customer_details"]["name"] = POISONS[poison]
        event = {
            "type": "checkout.session.completed",
            "data": {"object": session},
            "created": created - 300 + i,
        }
        events.append(fake_stripe.control("insert_event", event))

    for attempt in range(2):
        run = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1))
        assert run["status"] == "completed" and run["seen"] == 3 and run["unreadable"] == 1
        assert run["recovered"] == (2 if attempt == 0 else 0)
        (found,) = unreadable(db, "stripe")
        assert found["ref"] == events[1]["id"] and found["evidence"]["error"].startswith("22P0")
    assert wallet(db, org)["balance_minor"] == 1000 + 1002
    assert db.execute("SELECT count(*) AS n FROM billing.discrepancies").fetchone()["n"] == 1  # no phantom


def test_a_session_with_a_currency_conversion_is_credited_from_its_raw_json(
    service, db, pool, fake_stripe, shim_config
):
    """stripe-python decodes currency_conversion.fx_rate as Decimal, which to_dict() keeps and no
    JSON encoder writes: the run now reads the response body itself."""
    from tests.senders import paid_checkout

    org = open_wallet(service)
    session, pi = paid_checkout(org, 2500)
    session["currency_conversion"] = payloads.stripe_currency_conversion(
        amount_total=2707, source_currency="eur"
    )
    fake_stripe.control("insert_event", {"type": "checkout.session.completed", "data": {"object": session}})
    run = reconcile_stripe(pool, make_client(shim_config), timedelta(days=1))
    assert run["status"] == "completed" and (run["recovered"], run["unreadable"]) == (1, 0)
    assert wallet(db, org)["balance_minor"] == 2500
    entry = db.execute("SELECT provider_ref FROM billing.ledger_entries WHERE org_id = %s", (org,)).fetchone()
    assert entry["provider_ref"] == f"stripe:payment_intent:{pi}"


def test_waiting_on_a_lock_is_not_an_unreadable_object_the_run_fails_to_resume(service, db, db_url):
    """Only the object's own faults are recorded: a lock timeout (another session holds the
    event's advisory lock) fails the statement, so the run fails and resumes from its cursor."""
    import json

    import psycopg

    from tests.senders import paid_checkout, stripe_event

    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    run = service.execute(
        "SELECT api.start_reconciliation_run('stripe', now() - interval '1 day', now()) AS r"
    ).fetchone()["r"]["run_id"]
    with psycopg.connect(db_url) as other:
        other.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"creditledger.event:stripe:{event['id']}",),
        )
        service.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            service.execute(
                "SELECT api.reconcile_object(%s, 'stripe', %s, %s)", (run, event["id"], json.dumps(event))
            )
    assert db.execute("SELECT count(*) AS n FROM billing.discrepancies").fetchone()["n"] == 0
    assert ledger_count(db, org) == 0
