"""Signed bodies Python's JSON reads and PostgreSQL refuses (or whose shape names no event) are
stored as received, failed then dead and alerted, and answered 200 once committed, so the
provider stops retrying a body no retry can change. Only an unsigned or non-JSON body is a 400."""

import json
import urllib.parse
from datetime import UTC, datetime, timedelta

import pytest

from shim.fakes import payloads
from tests.conftest import SECRETS
from tests.db_helpers import ledger_count, open_wallet, snapshot, wallet
from tests.senders import TWILIO_PATH, paid_checkout, post_stripe, stripe_event

START = datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)
DEEP = 1500  # past Python's recursion limit (1000): json.loads raises RecursionError


def dumps_deep(document: dict) -> str:
    """The document's JSON with its "__deep__" string replaced by arrays nested DEEP levels."""
    return json.dumps(document).replace('"__deep__"', "[" * DEEP + "]" * DEEP)


def stripe_body(org, case: str) -> str:
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    name = session["customer_details"]
    if case == "nul":
        name["name"] = "Ana\x00Lopez"  # json.dumps writes \u0000
    elif case == "lone_surrogate":
        name["name"] = "Ana \ud800"  # json.dumps writes \ud800
    elif case in ("nan", "infinity"):
        session["amount_subtotal"] = float(case.replace("infinity", "inf"))  # NaN / Infinity
    elif case == "deep":
        session["metadata"]["nested"] = "__deep__"
        return dumps_deep(event)
    elif case == "type_object":
        event["type"] = {"name": "checkout.session.completed"}
    return json.dumps(event)


def vapi_body(org, case: str) -> str:
    call = payloads.vapi_call(
        assistant_id=f"asst-{org}", started_at=START, ended_at=START + timedelta(seconds=60)
    )
    message = payloads.vapi_end_of_call_report(call)
    inner = message["message"]
    if case == "nul":
        inner["call"]["customer"]["name"] = "Ana\x00Lopez"
    elif case == "lone_surrogate":
        inner["call"]["customer"]["name"] = "Ana \ud800"
    elif case in ("nan", "infinity"):
        inner["call"]["cost"] = float(case.replace("infinity", "inf"))
    elif case == "deep":
        inner["call"]["metadata"] = {"nested": "__deep__"}
        return dumps_deep(message)
    elif case == "type_object":
        inner["type"] = {"name": "end-of-call-report"}
    elif case == "call_string":
        inner["call"] = inner["call"]["id"]
    return json.dumps(message)


def send_stripe(client, text: str):
    return post_stripe(client, None, body=text.encode())


def send_vapi(client, text: str):
    return client.post(
        "/webhooks/vapi",
        data=text.encode(),
        content_type="application/json",
        headers={"X-Vapi-Secret": SECRETS["vapi_webhook_secret"]},
    )


def twilio_form(case: str) -> dict:
    params = payloads.twilio_status_callback(
        message_sid=payloads.twilio_sid("SM"),
        status="delivered",
        account_sid="AC" + "0" * 32,
        from_="+15550000001",
        to="+15550000002",
    )
    if case == "nul_in_field":
        params["To"] = "+1555\x000000002"
    elif case == "nul_in_status":
        params["MessageStatus"] = params["SmsStatus"] = "deliv\x00ered"
    elif case == "no_status":
        params.pop("MessageStatus")
        params.pop("SmsStatus", None)
    return params


def send_twilio(client, text: str):
    """POST the form exactly as `text` (URL-encoded), signed over its fields."""
    params = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
    url = SECRETS["public_base_url"] + TWILIO_PATH
    return client.post(
        TWILIO_PATH,
        data=text.encode(),
        content_type="application/x-www-form-urlencoded",
        headers={"X-Twilio-Signature": payloads.sign_twilio(url, params, SECRETS["twilio_auth_token"])},
    )


JSON_CASES = ["nul", "lone_surrogate", "nan", "infinity", "deep", "type_object"]
CASES = (
    [("stripe", case) for case in JSON_CASES]
    + [("vapi", case) for case in [*JSON_CASES, "call_string"]]
    + [("twilio", case) for case in ("nul_in_field", "nul_in_status", "no_status")]
)


def body_for(provider: str, org, case: str) -> str:
    if provider == "stripe":
        return stripe_body(org, case)
    if provider == "vapi":
        return vapi_body(org, case)
    return urllib.parse.urlencode(twilio_form(case))


SEND = {"stripe": send_stripe, "vapi": send_vapi, "twilio": send_twilio}


@pytest.mark.parametrize(("provider", "case"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_signed_body_that_cannot_apply_is_stored_answered_200_and_goes_dead(
    client, service, db, provider, case
):
    org = open_wallet(service, balance_minor=1_000)
    text = body_for(provider, org, case)
    send = SEND[provider]
    entries = ledger_count(db)

    answer = send(client, text)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.json["status"] == "failed" and answer.json["error"]
    (row,) = db.execute("SELECT * FROM billing.webhook_events").fetchall()
    assert (row["provider"], row["status"], row["id"]) == (provider, "failed", answer.json["event_row_id"])
    assert row["last_error"] == answer.json["error"] and row["next_attempt_at"] is not None
    if case == "call_string":
        # Valid JSON PostgreSQL holds: kept as the payload; its shape fails the handler (22023).
        assert row["payload"] == json.loads(text) and row["raw_body"] is None
        assert row["last_error"].startswith("22023")
    else:
        assert row["payload"] is None and row["raw_body"] == text  # exactly as received

    # The provider's retry of the same body is a duplicate: nothing new is stored.
    before = snapshot(db)
    again = send(client, text)
    assert again.status_code == 200 and again.json["status"] == "duplicate"
    assert snapshot(db) == before
    assert ledger_count(db) == entries and wallet(db, org)["balance_minor"] == 1_000

    # The worker's retries fail the same way until the event is dead, and that alerts.
    db.execute("UPDATE billing.settings SET webhook_max_attempts = 2")
    db.execute("UPDATE billing.webhook_events SET next_attempt_at = now()")
    assert service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"] == {"dead": 1}
    dead = db.execute("SELECT * FROM billing.webhook_events").fetchone()
    assert dead["status"] == "dead" and dead["last_error"] == row["last_error"]
    alerts = service.execute(
        "SELECT provider, firing FROM api.health_alerts() WHERE alert = 'WebhookDeadLetters'"
    ).fetchall()
    assert {"provider": provider, "firing": True} in alerts
    assert ledger_count(db) == entries


def test_an_operator_fixes_and_replays_or_discards_an_unreadable_body(client, service, db):
    """docs/runbook.md: the stored body is read as the owner; a corrected payload is replayed
    through the worker (the raw body stays as evidence), or the event is discarded with a reason."""
    org = open_wallet(service)
    fixable, doomed = stripe_body(org, "nul"), stripe_body(org, "nul")
    fixed_id = send_stripe(client, fixable).json["event_row_id"]
    doomed_id = send_stripe(client, doomed).json["event_row_id"]
    seen = db.execute("SELECT raw_body, last_error FROM billing.webhook_events WHERE id = %s", (fixed_id,))
    seen = seen.fetchone()
    assert seen["raw_body"] == fixable and seen["last_error"].startswith("22P05")

    corrected = fixable.replace("\\u0000", "")
    db.execute(
        "UPDATE billing.webhook_events SET payload = %s::jsonb WHERE id = %s AND payload IS NULL",
        (corrected, fixed_id),
    )
    service.execute("SELECT api.replay_webhook_event(%s)", (fixed_id,))
    assert service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"] == {"processed": 1}
    assert wallet(db, org)["balance_minor"] == 2500
    assert db.execute(
        "SELECT raw_body FROM billing.webhook_events WHERE id = %s", (fixed_id,)
    ).fetchone() == {"raw_body": fixable}

    service.execute("SELECT api.discard_webhook_event(%s, 'TCK-1: customer name had a NUL')", (doomed_id,))
    row = db.execute("SELECT status FROM billing.webhook_events WHERE id = %s", (doomed_id,)).fetchone()
    assert row["status"] == "ignored" and wallet(db, org)["balance_minor"] == 2500


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        ("stripe", b"not json"),
        ("stripe", b'{"id": "evt_1", "type": "x\x00"}'),  # a raw NUL: JSON escapes control characters
        ("vapi", b"not json"),
        ("vapi", b'{"message": {"type": "status-update"'),
        ("vapi", b'{"message": "\xff\xfe"}'),  # not UTF-8
    ],
)
def test_signed_body_that_is_not_json_is_400_and_stores_nothing(client, db, provider, body):
    before = snapshot(db)
    if provider == "stripe":
        answer = post_stripe(client, None, body=body)
    else:
        headers = {"X-Vapi-Secret": SECRETS["vapi_webhook_secret"]}
        answer = client.post("/webhooks/vapi", data=body, content_type="application/json", headers=headers)
    assert answer.status_code == 400
    assert snapshot(db) == before


def test_a_json_body_that_is_no_object_is_stored_not_refused(client, db):
    """An array is JSON: signed, it is the provider's, so it is kept for an operator."""
    answer = send_stripe(client, "[1, 2, 3]")
    assert answer.status_code == 200 and answer.json["status"] == "failed"
    row = db.execute("SELECT * FROM billing.webhook_events").fetchone()
    assert row["raw_body"] == "[1, 2, 3]" and row["last_error"].startswith("payload: must be a JSON object")
