"""Vapi server messages through the real HTTP stack: holds on in-progress, charges on report."""

from datetime import UTC, datetime, timedelta

from shim.fakes import payloads
from tests.db_helpers import ledger_count, open_wallet, route_assistant, snapshot, wallet
from tests.senders import post_vapi

START = datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)


def ended_call(assistant_id=None, seconds=125.2, **kwargs):
    return payloads.vapi_call(
        assistant_id=assistant_id,
        started_at=START,
        ended_at=START + timedelta(seconds=seconds),
        **kwargs,
    )


def test_status_update_holds_and_report_charges(client, service, db):
    org = open_wallet(service, balance_minor=10_000)
    live = payloads.vapi_call(
        assistant_id=route_assistant(service, org), started_at=START, status="in-progress"
    )
    answer = post_vapi(client, payloads.vapi_status_update(live, "in-progress"))
    # Admitted for what the wallet affords, at most the default maximum call (60 min at 70/min).
    assert answer.json["result"]["status"] == "applied"
    assert answer.json["result"]["max_duration_seconds"] == 3600
    assert wallet(db, org)["held_minor"] == 60 * 70

    call = ended_call(route_assistant(service, org), call_id=live["id"])
    report = post_vapi(client, payloads.vapi_end_of_call_report(call))
    assert report.status_code == 200
    # 125.2 s rounds up to 126 s; ceil(126 * 70 / 60) = 147
    assert report.json["result"] == {
        "status": "applied",
        "entry_id": report.json["result"]["entry_id"],
        "amount_minor": -147,
        "balance_minor": 10_000 - 147,
        "reason": None,
    }
    assert wallet(db, org)["held_minor"] == 0


def test_report_redelivered_charges_once(client, service, db):
    org = open_wallet(service, balance_minor=10_000)
    message = payloads.vapi_end_of_call_report(ended_call(route_assistant(service, org)))
    post_vapi(client, message)
    before = snapshot(db)
    again = post_vapi(client, message, hmac_auth=True)
    assert again.json["status"] == "duplicate"
    assert snapshot(db) == before


def test_status_update_after_the_report_places_no_hold(client, service, db):
    org = open_wallet(service, balance_minor=10_000)
    call = ended_call(route_assistant(service, org))
    post_vapi(client, payloads.vapi_end_of_call_report(call))
    late = post_vapi(client, payloads.vapi_status_update(dict(call, status="in-progress"), "in-progress"))
    assert late.json["result"]["reason"] == "already_charged"
    assert wallet(db, org)["held_minor"] == 0


def test_call_that_never_connected_charges_nothing_and_frees_its_hold(client, service, db):
    org = open_wallet(service, balance_minor=1_000)
    live = payloads.vapi_call(
        assistant_id=route_assistant(service, org), started_at=START, status="in-progress"
    )
    post_vapi(client, payloads.vapi_status_update(live, "in-progress"))
    never = payloads.vapi_call(
        assistant_id=route_assistant(service, org),
        call_id=live["id"],
        ended_at=START,
        ended_reason="customer-did-not-answer",
    )
    never.pop("startedAt", None)
    message = payloads.vapi_end_of_call_report(never)
    message["message"].pop("startedAt", None)
    answer = post_vapi(client, message)
    assert answer.json["result"]["amount_minor"] == 0
    assert wallet(db, org)["balance_minor"] == 1_000
    assert wallet(db, org)["held_minor"] == 0


def test_org_from_routing_table_when_metadata_has_none(client, service, db):
    org = open_wallet(service, balance_minor=1_000)
    service.execute("SELECT api.set_vapi_route('assistant', 'asst-123', %s)", (org,))
    call = ended_call("asst-123", seconds=60)
    answer = post_vapi(client, payloads.vapi_end_of_call_report(call))
    assert answer.json["result"]["amount_minor"] == -70
    assert wallet(db, org)["balance_minor"] == 930


def test_unattributable_call_is_stored_and_replayable(client, service, db):
    org = open_wallet(service, balance_minor=1_000)
    call = ended_call(None, seconds=60, phone_number_id="pn-9")
    answer = post_vapi(client, payloads.vapi_end_of_call_report(call))
    assert answer.json["status"] == "unattributed"
    assert ledger_count(db, org) == 1
    row = db.execute("SELECT * FROM billing.webhook_events WHERE status = 'unattributed'").fetchone()

    # An operator adds the route and replays: the call is charged once.
    service.execute("SELECT api.set_vapi_route('phone_number', 'pn-9', %s)", (org,))
    service.execute("SELECT api.replay_webhook_event(%s)", (row["id"],))
    assert service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"] == {"processed": 1}
    assert wallet(db, org)["balance_minor"] == 930


def test_same_call_reported_with_another_duration_is_a_conflict(client, service, db):
    org = open_wallet(service, balance_minor=1_000)
    call = ended_call(route_assistant(service, org), seconds=60)
    post_vapi(client, payloads.vapi_end_of_call_report(call))
    longer = payloads.vapi_end_of_call_report(call, started_at=START, ended_at=START + timedelta(seconds=90))
    longer["message"]["timestamp"] += 1
    # Redelivered under the same event id: a duplicate at the inbox, nothing changes.
    assert post_vapi(client, longer).json["status"] == "duplicate"
    # Reported directly with another duration: a conflict, kept for reconciliation.
    r = service.execute("SELECT * FROM api.deduct_call_credits(%s, %s, 90)", (org, call["id"])).fetchone()
    assert r["status"] == "conflict"
    assert db.execute("SELECT kind FROM billing.discrepancies").fetchone()["kind"] == "duration_mismatch"
    assert wallet(db, org)["balance_minor"] == 930


def test_wrong_vapi_secret_and_stale_hmac_are_400(client, service, db):
    org = open_wallet(service, balance_minor=1_000)
    message = payloads.vapi_end_of_call_report(ended_call(route_assistant(service, org)))
    before = snapshot(db)
    assert post_vapi(client, message, secret="wrong").status_code == 400
    assert post_vapi(client, message, secret="wrong", hmac_auth=True).status_code == 400
    import json

    body = json.dumps(message).encode()
    stale = payloads.vapi_hmac_headers(body, "vapi-test-secret", timestamp=1_000_000_000_000)
    answer = client.post("/webhooks/vapi", data=body, content_type="application/json", headers=stale)
    assert answer.status_code == 400
    assert snapshot(db) == before
