"""Twilio SMS status callbacks: late, twice, out of order, and never regressing."""

import pytest

from shim.fakes import payloads
from tests.db_helpers import open_wallet, snapshot, wallet
from tests.senders import post_twilio

ACCOUNT = "AC" + "0" * 32


def callback(sid, status):
    return payloads.twilio_status_callback(
        message_sid=sid, status=status, account_sid=ACCOUNT, from_="+15550000001", to="+15550000002"
    )


@pytest.fixture
def sms(service):
    org = open_wallet(service, balance_minor=100, sms_segment_minor=2)
    sid = payloads.twilio_sid("SM")
    r = service.execute("SELECT * FROM api.register_sms(%s, %s, 3)", (org, sid)).fetchone()
    assert r["status"] == "applied" and r["amount_minor"] == 6
    return org, sid


def test_delivered_charges_the_held_cost(client, db, sms):
    org, sid = sms
    assert post_twilio(client, callback(sid, "sent")).json["result"]["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 94
    assert wallet(db, org)["held_minor"] == 0
    delivered = post_twilio(client, callback(sid, "delivered"))
    assert delivered.status_code == 200
    assert wallet(db, org)["balance_minor"] == 94


def test_delivered_before_sent_charges_once(client, db, sms):
    org, sid = sms
    post_twilio(client, callback(sid, "delivered"))
    late_sent = post_twilio(client, callback(sid, "sent"))
    assert late_sent.json["result"]["reason"] == "stale_status"
    assert wallet(db, org)["balance_minor"] == 94


def test_failed_releases_and_late_sent_does_not_charge(client, db, sms):
    org, sid = sms
    post_twilio(client, callback(sid, "failed"))
    assert wallet(db, org)["held_minor"] == 0
    post_twilio(client, callback(sid, "sent"))
    assert wallet(db, org)["balance_minor"] == 100


def test_same_callback_twice_is_a_duplicate(client, db, sms):
    _, sid = sms
    post_twilio(client, callback(sid, "sent"))
    before = snapshot(db)
    assert post_twilio(client, callback(sid, "sent")).json["status"] == "duplicate"
    assert snapshot(db) == before


def test_callback_before_registration_waits_for_the_worker(client, service, db):
    org = open_wallet(service, balance_minor=100)
    sid = payloads.twilio_sid("SM")
    early = post_twilio(client, callback(sid, "delivered"))
    assert early.status_code == 200 and early.json["status"] == "failed"
    service.execute("SELECT * FROM api.register_sms(%s, %s, 1)", (org, sid))
    db.execute("UPDATE billing.webhook_events SET next_attempt_at = now()")
    assert service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"] == {"processed": 1}
    assert wallet(db, org)["balance_minor"] == 99


def test_tampered_twilio_signature_is_400(client, db, sms):
    _, sid = sms
    params = callback(sid, "delivered")
    before = snapshot(db)
    answer = post_twilio(client, params, token="wrong-token")
    assert answer.status_code == 400
    assert snapshot(db) == before
