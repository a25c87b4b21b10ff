"""Call admission: the debt limit holds where calls happen, and the server alone decides who pays.

SQL's api.admit_call, then the whole protocol over HTTP: the fake Vapi places inbound, web and
outbound calls against the running shim, checks every message and answer against the official
SDK's types, cuts admitted calls at maxDurationSeconds and ends calls on their control URL."""

import uuid

import psycopg
import pytest

from shim.call_control import end_due_calls
from shim.fakes import payloads
from shim.fakes.vapi_types import check_assistant_answer
from shim.reconcile import VapiCalls, reconcile_vapi
from tests.conftest import SECRETS, VAPI_API_KEY
from tests.db_helpers import ledger_count, open_wallet, route_assistant, snapshot, wallet
from tests.jwt_tokens import bearer, supabase_token
from tests.senders import paid_checkout, post_stripe, post_vapi, stripe_event


def admit(service, org, call_id, max_minutes=None) -> dict:
    return service.execute("SELECT * FROM api.admit_call(%s, %s, %s)", (org, call_id, max_minutes)).fetchone()


def discrepancies(db, kind) -> list:
    return db.execute("SELECT * FROM billing.discrepancies WHERE kind = %s", (kind,)).fetchall()


def inbound_number(service, org) -> str:
    number = f"pn-{uuid.uuid4()}"
    service.execute("SELECT api.set_inbound_assistant(%s, %s, %s)", (org, number, f"asst-in-{org}"))
    return number


# ---------------------------------------------------------------------------- api.admit_call


def test_admission_is_what_the_wallet_affords_capped_by_the_longest_call(service, db):
    org = open_wallet(service, balance_minor=700)  # 10 minutes at 70/min
    a = admit(service, org, "call-1")
    assert (a["status"], a["max_duration_seconds"], a["amount_minor"]) == ("applied", 600, 700)
    assert wallet(db, org)["held_minor"] == 700

    rich = open_wallet(service, balance_minor=1_000_000, debt_limit_minor=500)
    assert admit(service, rich, "call-2")["max_duration_seconds"] == 3600  # the default 60 minutes
    service.execute("SELECT api.set_max_call_minutes(%s, 15)", (rich,))
    assert admit(service, rich, "call-3")["max_duration_seconds"] == 900
    assert admit(service, rich, "call-4", 2)["max_duration_seconds"] == 120


def test_the_debt_limit_is_part_of_what_a_wallet_affords(service, db):
    org = open_wallet(service, balance_minor=140, debt_limit_minor=70)
    a = admit(service, org, "call-1")
    assert (a["max_duration_seconds"], a["amount_minor"]) == (180, 210)
    assert admit(service, org, "call-2")["reason"] == "insufficient_funds"


def test_admitted_seconds_are_whole_billing_increments(service, db):
    org = open_wallet(service, balance_minor=100, rate_per_minute_minor=70, billing_increment_seconds=60)
    a = admit(service, org, "call-1")  # 100 buys 85 s, 60 s in whole minutes
    assert (a["max_duration_seconds"], a["amount_minor"]) == (60, 70)


@pytest.mark.parametrize(
    ("balance", "suspend", "reason"),
    [(69, False, "insufficient_funds"), (10_000, True, "wallet_suspended")],
)
def test_refused_admissions_hold_nothing_and_stay_refused(service, db, balance, suspend, reason):
    org = open_wallet(service, balance_minor=balance)
    if suspend:
        db.execute("UPDATE billing.wallets SET status = 'suspended' WHERE org_id = %s", (org,))
    first = admit(service, org, "call-1")
    assert (first["status"], first["reason"], first["max_duration_seconds"]) == ("rejected", reason, None)
    assert wallet(db, org)["held_minor"] == 0
    service.execute("SELECT api.add_wallet_credits(%s, 100000, 'more')", (org,))
    again = admit(service, org, "call-1")
    assert (again["status"], again["reason"], again["max_duration_seconds"]) == ("duplicate", reason, None)


def test_a_second_admission_of_a_call_answers_the_first_and_holds_nothing_more(service, db):
    org = open_wallet(service, balance_minor=700)
    first = admit(service, org, "call-1")
    before = snapshot(db)
    again = admit(service, org, "call-1")
    assert again["status"] == "duplicate"
    assert again["max_duration_seconds"] == first["max_duration_seconds"]
    assert snapshot(db) == before


def test_admission_of_an_unknown_org_and_invalid_input(service):
    assert admit(service, uuid.uuid4(), "call-1")["reason"] == "unknown_org"
    org = open_wallet(service, balance_minor=700)
    bad = (((org, "c", 0), "max_minutes"), ((org, "c", 721), "max_minutes"), ((org, None, 5), "call_id"))
    for args, field in bad:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=field):
            service.execute("SELECT * FROM api.admit_call(%s, %s, %s)", args)


# ---------------------------------------------------------------------------- over HTTP


@pytest.fixture
def phone(shim_app, fake_vapi):
    """The fake Vapi placing calls against the shim served on loopback."""
    from shim.fakes.serve import serve_in_thread

    url, stop = serve_in_thread(shim_app)
    fake_vapi.control("server", {"url": f"{url}/webhooks/vapi", "secret": SECRETS["vapi_webhook_secret"]})
    yield fake_vapi
    stop()


def test_inbound_call_is_admitted_and_cut_at_its_admitted_seconds(phone, service, db):
    org = open_wallet(service, balance_minor=700)
    call = phone.control("inbound", {"phone_number_id": inbound_number(service, org), "talk_seconds": 3600})
    answer = check_assistant_answer(call["answer"])
    assert answer["assistantId"] == f"asst-in-{org}"
    assert answer["assistantOverrides"]["maxDurationSeconds"] == 600
    assert answer["assistantOverrides"]["metadata"]["org_id"] == str(org)
    entry = db.execute("SELECT * FROM billing.ledger_entries WHERE kind = 'call_charge'").fetchone()
    assert entry["details"]["ended_reason"] == "exceeded-max-duration"
    assert (entry["amount_minor"], entry["details"]["duration_seconds"]) == (-700, 600)
    assert wallet(db, org)["balance_minor"] == 0
    assert wallet(db, org)["held_minor"] == 0


def test_a_dry_wallet_refuses_the_next_inbound_call(phone, service, db):
    org = open_wallet(service, balance_minor=700)
    number = inbound_number(service, org)
    phone.control("inbound", {"phone_number_id": number, "talk_seconds": 3600})
    refused = phone.control("inbound", {"phone_number_id": number, "talk_seconds": 60})
    assert refused["refused"] is True
    refusal = "Sorry, this line cannot take calls right now. Please try again later."
    assert refused["answer"] == {"error": refusal}
    check_assistant_answer(refused["answer"])
    assert wallet(db, org)["held_minor"] == 0
    assert wallet(db, org)["balance_minor"] == 0  # the unanswered call cost nothing


def test_assistant_request_retried_gets_the_same_answer_and_holds_once(client, service, db):
    org = open_wallet(service, balance_minor=700)
    number = inbound_number(service, org)
    call = payloads.vapi_call(status="ringing", call_type="inboundPhoneCall", phone_number_id=number)
    message = payloads.vapi_assistant_request(call)
    first = post_vapi(client, message)
    message["message"]["timestamp"] += 250  # Vapi retried: new bytes, same call
    again = post_vapi(client, message)
    assert first.status_code == again.status_code == 200
    assert first.json == again.json
    assert first.json["assistantOverrides"]["maxDurationSeconds"] == 600
    assert wallet(db, org)["held_minor"] == 700


@pytest.mark.parametrize("case", ["no phone number", "unknown number", "number without assistant"])
def test_assistant_request_nobody_can_answer_is_refused_and_holds_nothing(client, service, db, case):
    org = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(status="ringing", call_type="inboundPhoneCall")
    message = payloads.vapi_assistant_request(call)
    if case == "no phone number":
        del message["message"]["phoneNumber"], message["message"]["call"]["phoneNumberId"]
    elif case == "number without assistant":
        service.execute("SELECT api.set_vapi_route('phone_number', %s, %s)", (call["phoneNumberId"], org))
    answer = post_vapi(client, message)
    assert answer.status_code == 200
    assert set(answer.json) == {"error"}
    assert wallet(db, org)["held_minor"] == 0
    stored = db.execute("SELECT status FROM billing.webhook_events").fetchone()
    assert stored["status"] == "unattributed"  # alerted: an operator routes the number


@pytest.mark.parametrize(
    "message",
    [
        {"message": {"type": {"name": "assistant-request"}}},
        {"message": "assistant-request"},
        {"message": {"type": "assistant-request", "call": "not-a-call"}},
        {"message": {"type": "assistant-request", "call": {"id": 42}, "phoneNumber": []}},
    ],
)
def test_malformed_assistant_requests_get_a_clear_answer_never_a_500(client, service, db, message):
    org = open_wallet(service, balance_minor=10_000)
    answer = post_vapi(client, message)
    assert answer.status_code in (200, 400)
    if answer.status_code == 200:
        # Refused as an assistant-request, or (no usable type) stored as received, failed.
        assert set(answer.json) == {"error"} or answer.json["status"] == "failed"
    assert wallet(db, org)["held_minor"] == 0


def test_the_callers_metadata_never_chooses_the_payer(client, service, db):
    a = open_wallet(service, balance_minor=10_000)
    b = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, a),
        overrides_metadata={"org_id": str(b)},
        started_at=payloads.datetime(2026, 11, 24, 9, tzinfo=payloads.UTC),
        ended_at=payloads.datetime(2026, 11, 24, 9, 10, tzinfo=payloads.UTC),
        call_type="webCall",
    )
    answer = post_vapi(client, payloads.vapi_end_of_call_report(call))
    assert answer.json["org_id"] == str(a)
    assert (wallet(db, a)["balance_minor"], wallet(db, b)["balance_minor"]) == (9_300, 10_000)
    (mismatch,) = discrepancies(db, "attribution_mismatch")
    assert mismatch["evidence"]["charged_org_id"] == str(a)
    assert mismatch["evidence"]["claimed_org_id"] == str(b)


def test_a_claimed_org_without_a_route_charges_nobody_and_is_alerted(client, service, db):
    b = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(
        overrides_metadata={"org_id": str(b)},
        started_at=payloads.datetime(2026, 11, 24, 9, tzinfo=payloads.UTC),
        ended_at=payloads.datetime(2026, 11, 24, 9, 1, tzinfo=payloads.UTC),
    )
    assert post_vapi(client, payloads.vapi_end_of_call_report(call)).json["status"] == "unattributed"
    assert wallet(db, b)["balance_minor"] == 10_000
    assert discrepancies(db, "attribution_mismatch")[0]["evidence"]["charged_org_id"] is None


def test_a_number_moved_mid_call_charges_the_org_that_admitted_it(phone, service, db):
    a = open_wallet(service, balance_minor=10_000)
    b = open_wallet(service, balance_minor=10_000)
    number = inbound_number(service, a)
    call = phone.control("inbound", {"phone_number_id": number, "talk_seconds": None})  # still talking
    service.execute("SELECT api.set_inbound_assistant(%s, %s, 'asst-b')", (b, number))
    assert phone.control(f"hang_up/{call['call_id']}", {"seconds": 600})["ended"]
    assert (wallet(db, a)["balance_minor"], wallet(db, b)["balance_minor"]) == (10_000 - 700, 10_000)
    assert discrepancies(db, "attribution_mismatch") == []


def test_a_call_report_meeting_another_orgs_entry_is_stored_as_a_conflict(client, service, db):
    a = open_wallet(service, balance_minor=10_000)
    b = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, a),
        started_at=payloads.datetime(2026, 11, 24, 9, tzinfo=payloads.UTC),
        ended_at=payloads.datetime(2026, 11, 24, 9, 1, tzinfo=payloads.UTC),
    )
    service.execute("SELECT api.deduct_call_credits(%s, %s, 60)", (b, call["id"]))  # someone charged B
    answer = post_vapi(client, payloads.vapi_end_of_call_report(call))
    assert answer.status_code == 200
    assert answer.json["status"] == "conflict"
    assert db.execute("SELECT status FROM billing.webhook_events").fetchone()["status"] == "conflict"
    (conflict,) = discrepancies(db, "other_org")
    assert (conflict["provider"], conflict["ref"], conflict["org_id"]) == ("vapi", call["id"], a)
    alerts = db.execute("SELECT * FROM api.health_alerts() WHERE firing").fetchall()
    assert any(alert["alert"] == "DiscrepanciesOpen" for alert in alerts)


def test_a_web_call_the_wallet_cannot_pay_is_ended_through_its_control_url_once(
    phone, shim_app, shim_config, service, db
):
    org = open_wallet(service, balance_minor=50)  # less than the minimum call
    assistant = route_assistant(service, org)
    call = phone.control("web_call", {"assistant_id": assistant, "talk_seconds": None})
    stats = phone.stats()
    assert stats["end_requests"] == [call["call_id"]]
    request = db.execute("SELECT * FROM billing.call_end_requests").fetchone()
    assert (request["status"], request["attempts"], request["reason"]) == ("ended", 1, "refused")
    # The worker's next pass finds nothing more to end.
    assert end_due_calls(shim_app.extensions["creditledger.pool"], shim_config) == {}
    assert phone.stats()["end_requests"] == [call["call_id"]]


def test_a_web_call_about_to_outrun_its_hold_is_ended_by_the_worker(phone, pool, shim_config, service, db):
    org = open_wallet(service, balance_minor=700)
    call = phone.control("web_call", {"assistant_id": route_assistant(service, org), "talk_seconds": None})
    hold = db.execute("SELECT * FROM billing.holds WHERE ref = %s", (call["call_id"],)).fetchone()
    assert (hold["max_duration_seconds"], hold["enforced_by"]) == (600, "control_url")
    assert end_due_calls(pool, shim_config) == {}  # nine minutes and more to go
    backdate = "UPDATE billing.holds SET created_at = now() - interval '590 seconds' WHERE id = %s"
    db.execute(backdate, (hold["id"],))
    assert end_due_calls(pool, shim_config) == {"ended": 1}
    assert end_due_calls(pool, shim_config) == {}
    assert phone.stats()["end_requests"] == [call["call_id"]]


def test_an_untrusted_control_url_is_never_called_and_ends_alerted(pool, shim_config, service, db):
    org = open_wallet(service, balance_minor=50)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, org),
        status="in-progress",
        started_at=payloads.datetime.now(payloads.UTC),
        call_type="webCall",
    )
    call["monitor"]["controlUrl"] = "http://169.254.169.254/latest/meta-data"
    service.execute(
        "SELECT api.ingest_webhook('vapi', 'su', 'status-update', %s)",
        (psycopg.types.json.Jsonb(payloads.vapi_status_update(call, "in-progress")),),
    )
    outcomes = []
    for _ in range(5):
        db.execute("UPDATE billing.call_end_requests SET next_attempt_at = now()")
        outcomes.append(end_due_calls(pool, shim_config))
    assert outcomes == [{"pending": 1}] * 4 + [{"failed": 1}]
    request = db.execute("SELECT * FROM billing.call_end_requests").fetchone()
    assert "not one of VAPI_CONTROL_HOSTS" in request["last_error"]
    assert discrepancies(db, "call_not_ended")[0]["ref"] == call["id"]


# ---------------------------------------------------------------------------- POST /calls


def service_token() -> str:
    import time

    import jwt

    now = int(time.time())
    claims = {"iss": "supabase", "role": "service_role", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, SECRETS["supabase_jwt_secret"], algorithm="HS256")


def place(client, body, token=None):
    return client.post("/calls", json=body, headers=bearer(token or service_token()))


def outbound(org, **extra):
    return {
        "assistant_id": "asst-reminders",
        "phone_number_id": "pn-out",
        "customer": {"number": "+15555550100"},
        "org_id": str(org),
        **extra,
    }


def test_an_outbound_call_is_admitted_created_with_its_cap_and_bound(phone, shim_app, service, db):
    org = open_wallet(service, balance_minor=700)
    client = shim_app.test_client()
    answer = place(client, outbound(org))
    assert answer.status_code == 201
    assert answer.json["max_duration_seconds"] == 600
    created = phone.stats()
    hold = db.execute("SELECT * FROM billing.holds").fetchone()
    assert hold["ref"] == answer.json["call_id"]
    run = phone.control(f"run/{answer.json['call_id']}", {"talk_seconds": 5000})
    assert run["call_id"] == answer.json["call_id"]
    assert wallet(db, org)["balance_minor"] == 0  # cut at 600 s: exactly what was held
    assert created["unauthorized"] == 0


def test_a_user_places_calls_for_its_own_org_only(shim_app, phone, service, db):
    org = open_wallet(service, balance_minor=700)
    client = shim_app.test_client()
    body = outbound(org)
    del body["org_id"]
    assert place(client, body, supabase_token(org)).status_code == 201
    other = open_wallet(service, balance_minor=700)
    assert place(client, outbound(other), supabase_token(org)).status_code == 400
    assert wallet(db, other)["held_minor"] == 0


def test_a_refused_outbound_call_holds_nothing_and_calls_nobody(shim_app, phone, service, db):
    org = open_wallet(service, balance_minor=10)
    answer = place(shim_app.test_client(), outbound(org))
    assert (answer.status_code, answer.json["reason"]) == (402, "insufficient_funds")
    assert wallet(db, org)["held_minor"] == 0
    assert phone.stats()["requests"] == 0


def test_vapi_refusing_the_call_releases_its_admission(shim_app, phone, service, db):
    org = open_wallet(service, balance_minor=700)
    phone.control("fail", {"count": 1, "status": 500})
    answer = place(shim_app.test_client(), outbound(org))
    assert answer.status_code == 503
    assert wallet(db, org)["held_minor"] == 0


def test_a_crash_before_binding_charges_once_and_the_orphan_admission_expires(
    shim_config, phone, service, db
):
    from vapi import Vapi

    org = open_wallet(service, balance_minor=1400)
    service.execute("SELECT api.set_vapi_route('assistant', 'asst-reminders', %s)", (org,))
    admission = admit(service, org, "admission:crashed", 10)
    created = Vapi(token=VAPI_API_KEY, base_url=shim_config.vapi_api_base).calls.create(
        assistant_id="asst-reminders",
        phone_number_id="pn-out",
        customer={"number": "+15555550100"},
        assistant_overrides={"max_duration_seconds": 600},
    )
    # The shim died here: the hold is still keyed by the admission, not the call.
    phone.control(f"run/{created.id}", {"talk_seconds": 60})
    assert ledger_count(db, org) == 2  # the seed and the call, charged by route
    assert wallet(db, org)["balance_minor"] == 1400 - 70
    assert wallet(db, org)["held_minor"] == admission["amount_minor"] == 700  # only the orphan
    expire = "UPDATE billing.holds SET expires_at = now() - interval '1 second' WHERE ref = %s"
    db.execute(expire, ("admission:crashed",))
    service.execute("SELECT api.expire_holds()")
    assert wallet(db, org)["held_minor"] == 0


# ---------------------------------------------------------------------------- nothing settled silently


def test_a_payment_already_credited_to_another_org_is_stored_as_a_conflict(client, service, db):
    a = open_wallet(service)
    b = open_wallet(service)
    session, pi = paid_checkout(a, 2500)
    assert (
        post_stripe(client, stripe_event("checkout.session.completed", session)).json["status"] == "processed"
    )
    stolen, _ = paid_checkout(b, 2500)
    stolen["payment_intent"] = pi  # the same PaymentIntent, claimed for B
    answer = post_stripe(client, stripe_event("checkout.session.completed", stolen))
    assert (answer.status_code, answer.json["status"]) == (200, "conflict")
    (conflict,) = discrepancies(db, "other_org")
    assert (conflict["provider"], conflict["org_id"]) == ("stripe", b)
    assert (wallet(db, a)["balance_minor"], wallet(db, b)["balance_minor"]) == (2500, 0)


def test_reconciliation_records_a_call_another_org_was_charged_for(pool, service, db, fake_vapi):
    a = open_wallet(service, balance_minor=10_000)
    b = open_wallet(service, balance_minor=10_000)
    now = payloads.datetime.now(payloads.UTC)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, a),
        started_at=now - payloads.timedelta(minutes=30),
        ended_at=now - payloads.timedelta(minutes=29),
        updated_at=now - payloads.timedelta(minutes=28),
    )
    service.execute("SELECT api.deduct_call_credits(%s, %s, 60)", (b, call["id"]))
    fake_vapi.control("calls", [call])
    run = reconcile_vapi(pool, VapiCalls(fake_vapi.url, VAPI_API_KEY), payloads.timedelta(hours=2))
    assert run["status"] == "completed"
    (conflict,) = discrepancies(db, "other_org")
    assert (conflict["provider"], conflict["ref"], conflict["org_id"]) == ("vapi", call["id"], a)
    assert wallet(db, a)["balance_minor"] == 10_000


# ---------------------------------------------------------------------------- edges of the SQL


def test_binding_an_admission_is_idempotent_and_refuses_what_it_cannot_bind(service, db):
    a = open_wallet(service, balance_minor=700)
    b = open_wallet(service, balance_minor=700)
    admit(service, a, "admission:1", 2)
    bind = "SELECT * FROM api.bind_call(%s, %s, %s)"
    first = service.execute(bind, (a, "admission:1", "call-1")).fetchone()
    assert (first["status"], first["max_duration_seconds"]) == ("applied", 120)
    assert service.execute(bind, (a, "admission:1", "call-1")).fetchone()["status"] == "duplicate"
    assert service.execute(bind, (b, "admission:2", "call-1")).fetchone()["reason"] == "other_org"
    assert service.execute(bind, (a, "admission:none", "call-2")).fetchone()["reason"] == "unknown_admission"
    assert (
        service.execute(bind, (uuid.uuid4(), "admission:1", "call-3")).fetchone()["reason"] == "unknown_org"
    )
    assert db.execute("SELECT ref FROM billing.holds WHERE org_id = %s", (a,)).fetchone()["ref"] == "call-1"


def test_routing_and_call_length_settings_refuse_bad_input(service):
    org = open_wallet(service)
    cases = [
        ("SELECT api.set_inbound_assistant(%s, 'pn-1', 'asst-1')", (uuid.uuid4(),), "org_id"),
        ("SELECT api.set_inbound_assistant(%s, '', 'asst-1')", (org,), "phone_number_id"),
        ("SELECT api.set_inbound_assistant(%s, 'pn-1', NULL)", (org,), "assistant_id"),
        ("SELECT api.set_max_call_minutes(%s, 0)", (org,), "max_minutes"),
        ("SELECT api.set_max_call_minutes(%s, 60)", (uuid.uuid4(),), "org_id"),
        ("SELECT * FROM api.lease_call_ends(0)", (), "max_calls"),
        ("SELECT api.record_call_end('never-asked', true)", (), "call_id"),
        ("SELECT api.record_call_end('c', NULL)", (), "ended"),
    ]
    for query, args, field in cases:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=field):
            service.execute(query, args)
    assert (
        service.execute("SELECT * FROM api.set_max_call_minutes(%s, NULL)", (org,)).fetchone()["org_id"]
        == org
    )


def test_a_number_moved_by_its_route_loses_the_old_orgs_assistant(service, db):
    a = open_wallet(service)
    b = open_wallet(service)
    service.execute("SELECT api.set_inbound_assistant(%s, 'pn-1', 'asst-a')", (a,))
    service.execute("SELECT api.set_vapi_route('phone_number', 'pn-1', %s)", (a,))
    assert db.execute("SELECT assistant_id FROM billing.vapi_routes").fetchone()["assistant_id"] == "asst-a"
    service.execute("SELECT api.set_vapi_route('phone_number', 'pn-1', %s)", (b,))
    route = db.execute("SELECT org_id, assistant_id FROM billing.vapi_routes").fetchone()
    assert (route["org_id"], route["assistant_id"]) == (b, None)


def test_a_refused_call_without_a_control_url_fails_alerted_and_a_reported_one_needs_no_end(
    pool, shim_config, service, db
):
    org = open_wallet(service, balance_minor=50)
    assistant = route_assistant(service, org)
    now = payloads.datetime.now(payloads.UTC)
    blind = payloads.vapi_call(
        assistant_id=assistant, status="in-progress", started_at=now, call_type="webCall"
    )
    del blind["monitor"]
    reported = payloads.vapi_call(
        assistant_id=assistant, status="in-progress", started_at=now, call_type="webCall"
    )
    for call in (blind, reported):
        service.execute(
            "SELECT api.ingest_webhook('vapi', %s, 'status-update', %s)",
            (f"su-{call['id']}", psycopg.types.json.Jsonb(payloads.vapi_status_update(call, "in-progress"))),
        )
    service.execute("SELECT api.deduct_call_credits(%s, %s, 3)", (org, reported["id"]))
    assert end_due_calls(pool, shim_config) == {}
    states = {r["call_id"]: r["status"] for r in db.execute("SELECT * FROM billing.call_end_requests")}
    assert states == {blind["id"]: "failed", reported["id"]: "ended"}
    assert discrepancies(db, "call_not_ended")[0]["ref"] == blind["id"]
    assert (
        service.execute("SELECT api.record_call_end(%s, true)", (blind["id"],)).fetchone()["record_call_end"]
        == "failed"
    )  # a finished request stays as it ended
