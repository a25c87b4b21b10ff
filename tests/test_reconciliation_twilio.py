"""Twilio reconciliation: an SMS whose status callback never came (or is overdue) is settled from
Twilio's own record of the message, through the status callback's SQL path, exactly once; what
Twilio has not decided, or does not know, stays open."""

import json
import threading
from datetime import timedelta
from email.utils import parsedate_to_datetime

import psycopg
import pytest
import requests

from shim.cli import main
from shim.config import Config
from shim.fakes import payloads
from shim.reconcile import TwilioMessages, reconcile_twilio
from shim.retry import RetryableError
from shim.worker import reconcile_due, reconcile_provider
from tests.conftest import SECRETS, TWILIO_ACCOUNT_SID
from tests.db_helpers import ledger_count, open_wallet, snapshot, wallet
from tests.senders import post_twilio

# A run looks back at least past sms_hold_ttl (24 h), or expired SMS fall outside its window.
SINCE = timedelta(days=2)
SEGMENT_MINOR = 3


@pytest.fixture
def twilio_config(db_url, fake_twilio):
    return Config(
        database_url=db_url,
        twilio_account_sid=TWILIO_ACCOUNT_SID,
        twilio_auth_token=SECRETS["twilio_auth_token"],
        twilio_api_base=fake_twilio.url,
    )


@pytest.fixture
def messages(fake_twilio):
    return TwilioMessages(TWILIO_ACCOUNT_SID, SECRETS["twilio_auth_token"], fake_twilio.url)


@pytest.fixture
def org(service):
    return open_wallet(service, balance_minor=1000, sms_segment_minor=SEGMENT_MINOR)


def send_sms(service, db, org, segments=1, age=timedelta(hours=25)) -> str:
    """Register an outbound SMS `age` ago whose status callback never arrived; the worker's
    expire_holds releases holds past their 24 h and records an unsettled_sms discrepancy."""
    sid = payloads.twilio_sid("SM")
    assert (
        service.execute("SELECT * FROM api.register_sms(%s, %s, %s)", (org, sid, segments)).fetchone()[
            "status"
        ]
        == "applied"
    )
    db.execute(
        "UPDATE billing.holds SET created_at = now() - %s::interval, "
        "expires_at = now() - %s::interval + interval '24 hours' WHERE ref = %s",
        (age, age, sid),
    )
    service.execute("SELECT api.expire_holds()")
    return sid


def callback(client, sid, status):
    """Twilio's status callback for the message, signed, through the shim."""
    params = payloads.twilio_status_callback(
        message_sid=sid,
        status=status,
        account_sid=TWILIO_ACCOUNT_SID,
        from_="+15550100300",
        to="+15550100400",
    )
    answer = post_twilio(client, params)
    assert answer.status_code == 200
    return answer.json


def discrepancy(db, sid) -> dict:
    return db.execute(
        "SELECT * FROM billing.discrepancies "
        "WHERE provider = 'twilio' AND kind = 'unsettled_sms' AND ref = %s",
        (sid,),
    ).fetchone()


def sms_charges(db, sid=None) -> list:
    return db.execute(
        "SELECT * FROM billing.ledger_entries "
        "WHERE kind = 'sms_charge' AND (%s::text IS NULL OR provider_ref = %s) ORDER BY id",
        (sid, f"twilio:message:{sid}"),
    ).fetchall()


# ---------------------------------------------------------------------------- settling


def test_delivered_sms_whose_callback_was_lost_is_charged_once_and_a_late_callback_changes_nothing(
    client, service, db, pool, fake_twilio, messages, org
):
    sid = send_sms(service, db, org, segments=2)
    assert discrepancy(db, sid)["status"] == "open" and sms_charges(db) == []
    fake_twilio.control("messages", [{"sid": sid, "status": "delivered", "segments": 2}])

    run = reconcile_twilio(pool, messages, SINCE)
    assert (run["provider"], run["status"], run["seen"], run["recovered"]) == ("twilio", "completed", 1, 1)
    (charge,) = sms_charges(db, sid)
    assert charge["amount_minor"] == -2 * SEGMENT_MINOR
    assert wallet(db, org)["balance_minor"] == 1000 - 2 * SEGMENT_MINOR
    settled = discrepancy(db, sid)
    assert settled["status"] == "resolved"
    assert settled["resolution"] == (
        f"resolved automatically by Twilio reconciliation run {run['id']}: Twilio says delivered, "
        f"charged by ledger entry {charge['id']}"
    )
    assert fake_twilio.stats()["fetched"] == [sid]

    assert callback(client, sid, "delivered")["status"] == "duplicate"
    assert callback(client, sid, "sent")["result"]["status"] == "duplicate"
    assert sms_charges(db) == [charge]
    assert wallet(db, org)["balance_minor"] == 1000 - 2 * SEGMENT_MINOR


def test_failed_sms_is_not_charged_and_its_discrepancy_is_resolved(
    service, db, pool, fake_twilio, messages, org
):
    expired = send_sms(service, db, org)
    overdue = send_sms(service, db, org, age=timedelta(minutes=30))  # held, its callback is late
    assert wallet(db, org)["held_minor"] == SEGMENT_MINOR
    fake_twilio.control(
        "messages", [{"sid": expired, "status": "canceled"}, {"sid": overdue, "status": "failed"}]
    )

    run = reconcile_twilio(pool, messages, SINCE)
    assert (run["seen"], run["recovered"], run["already_applied"]) == (2, 0, 0)
    assert sms_charges(db) == []
    assert wallet(db, org)["balance_minor"] == 1000 and wallet(db, org)["held_minor"] == 0
    assert (
        db.execute("SELECT status FROM billing.holds WHERE ref = %s", (overdue,)).fetchone()["status"]
        == "released"
    )
    settled = discrepancy(db, expired)
    assert settled["status"] == "resolved" and settled["resolution"].endswith(
        "Twilio says canceled, nothing to bill"
    )
    assert discrepancy(db, overdue) is None  # settled before its hold expired: nothing to alert on


def test_sms_still_sending_stays_open_until_twilio_decides(service, db, pool, fake_twilio, messages, org):
    sid = send_sms(service, db, org)
    fresh = send_sms(service, db, org, age=timedelta(minutes=1))  # its callback may still come
    fake_twilio.control(
        "messages", [{"sid": sid, "status": "sending"}, {"sid": fresh, "status": "delivered"}]
    )

    run = reconcile_twilio(pool, messages, SINCE)
    assert (run["seen"], run["recovered"], run["discrepancies"]) == (1, 0, 1)
    assert fake_twilio.stats()["fetched"] == [sid]
    pending = discrepancy(db, sid)
    assert (pending["status"], pending["run_id"], pending["evidence"]["twilio_status"]) == (
        "open",
        run["id"],
        "sending",
    )
    assert sms_charges(db) == []

    fake_twilio.control("messages", [{"sid": sid, "status": "sent"}])
    later = reconcile_twilio(pool, messages, SINCE)
    assert later["recovered"] == 1 and discrepancy(db, sid)["status"] == "resolved"
    assert len(sms_charges(db, sid)) == 1


def test_message_unknown_to_twilio_stays_open_with_its_answer(service, db, pool, fake_twilio, messages, org):
    sid = send_sms(service, db, org)

    run = reconcile_twilio(pool, messages, SINCE)
    assert (run["status"], run["seen"], run["recovered"], run["discrepancies"]) == ("completed", 1, 0, 1)
    unknown = discrepancy(db, sid)
    assert unknown["status"] == "open"
    assert (unknown["evidence"]["twilio_error"]["code"], unknown["evidence"]["twilio_error"]["status"]) == (
        20404,
        404,
    )
    assert "twilio_status" not in unknown["evidence"] and unknown["evidence"]["held_minor"] == SEGMENT_MINOR
    assert sms_charges(db) == [] and wallet(db, org)["balance_minor"] == 1000


# ---------------------------------------------------------------------------- outages and repeats


def test_twilio_outage_fails_the_run_and_the_resumed_run_recovers(
    service, db, pool, fake_twilio, messages, twilio_config, org
):
    sid = send_sms(service, db, org)
    fake_twilio.control("messages", [{"sid": sid, "status": "delivered"}])
    fake_twilio.control("fail", {"count": 5, "status": 500})
    with pytest.raises(RetryableError):  # five 500s: the bounded backoff gives up
        reconcile_twilio(pool, messages, SINCE)
    failed = db.execute("SELECT * FROM billing.reconciliation_runs").fetchone()
    assert (failed["provider"], failed["status"]) == ("twilio", "failed") and "500" in failed["error"]
    assert fake_twilio.stats()["injected_failures"] == 5
    assert sms_charges(db) == [] and discrepancy(db, sid)["status"] == "open"

    resumed = reconcile_provider(pool, twilio_config, "twilio", resume=True)
    assert (resumed["id"], resumed["status"], resumed["recovered"]) == (failed["id"], "completed", 1)
    assert len(sms_charges(db, sid)) == 1 and discrepancy(db, sid)["status"] == "resolved"


def test_rate_limited_answers_are_retried_within_the_run(service, db, pool, fake_twilio, messages, org):
    sid = send_sms(service, db, org)
    fake_twilio.control("messages", [{"sid": sid, "status": "delivered"}])
    fake_twilio.control("fail", {"count": 2, "status": 429})
    run = reconcile_twilio(pool, messages, SINCE)
    assert (run["status"], run["recovered"]) == ("completed", 1)
    assert fake_twilio.stats()["requests"] == 3


def test_running_reconciliation_twice_changes_nothing_the_second_time(
    service, db, pool, fake_twilio, messages, org
):
    sids = [send_sms(service, db, org) for _ in range(4)]
    statuses = ["delivered", "read", "failed", "sending"]
    fake_twilio.control("messages", [{"sid": s, "status": st} for s, st in zip(sids, statuses, strict=True)])
    first = reconcile_twilio(pool, messages, SINCE)
    assert (first["seen"], first["recovered"]) == (4, 2)
    books = snapshot(db)
    open_ones = db.execute("SELECT ref FROM billing.discrepancies WHERE status = 'open'").fetchall()

    second = reconcile_twilio(pool, messages, SINCE)
    assert (second["seen"], second["recovered"], second["already_applied"]) == (1, 0, 0)  # only 'sending'
    assert snapshot(db) == books
    assert db.execute("SELECT ref FROM billing.discrepancies WHERE status = 'open'").fetchall() == open_ones
    assert [r["ref"] for r in open_ones] == [sids[3]]
    assert wallet(db, org)["balance_minor"] == 1000 - 2 * SEGMENT_MINOR


def test_concurrent_callbacks_and_reconciliations_charge_each_sms_once(
    shim_app, service, db, pool, fake_twilio, messages, org
):
    sids = [send_sms(service, db, org) for _ in range(20)]
    fake_twilio.control("messages", [{"sid": s, "status": "delivered"} for s in sids])
    start = threading.Barrier(3)
    errors = []

    def callbacks():
        client = shim_app.test_client()
        for i, sid in enumerate(sids):  # half say 'sent': another inbox event, the same ledger key
            callback(client, sid, "delivered" if i % 2 else "sent")

    def together(job):
        start.wait()
        try:
            job()
        except Exception as exc:  # surfaced below: a thread's own failure would be lost
            errors.append(exc)

    jobs = (
        callbacks,
        lambda: reconcile_twilio(pool, messages, SINCE),
        lambda: reconcile_twilio(pool, messages, SINCE),
    )
    threads = [threading.Thread(target=together, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(sms_charges(db)) == 20 and ledger_count(db, org) == 21
    assert wallet(db, org)["balance_minor"] == 1000 - 20 * SEGMENT_MINOR
    assert {discrepancy(db, s)["status"] for s in sids} == {"resolved"}


# ---------------------------------------------------------------------------- schedule and command line


def test_worker_reconciles_twilio_when_configured_and_when_due(
    service, db, pool, fake_twilio, twilio_config, org
):
    sid = send_sms(service, db, org)
    fake_twilio.control("messages", [{"sid": sid, "status": "delivered"}])
    report = reconcile_due(pool, twilio_config)
    assert report["stripe"] == report["vapi"] == "skipped: not configured"
    assert (report["twilio"]["status"], report["twilio"]["recovered"]) == ("completed", 1)
    assert "twilio" not in reconcile_due(pool, twilio_config)  # not due again for reconcile_every
    run = db.execute("SELECT * FROM billing.reconciliation_runs").fetchone()
    assert run["window_end"] - run["window_start"] == timedelta(days=7)  # reconcile_twilio_lookback
    assert len(sms_charges(db, sid)) == 1


def test_reconcile_twilio_command(monkeypatch, db_url, service, db, fake_twilio, org, capsys):
    old = send_sms(service, db, org, age=timedelta(days=3))
    recent = send_sms(service, db, org)
    fake_twilio.control("messages", [{"sid": s, "status": "delivered"} for s in (old, recent)])
    for name, value in {
        "DATABASE_URL": db_url,
        "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": SECRETS["twilio_auth_token"],
        "TWILIO_API_BASE": fake_twilio.url,
    }.items():
        monkeypatch.setenv(name, value)

    assert main(["reconcile", "twilio", "--since", "2d"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert (run["provider"], run["status"], run["seen"], run["recovered"]) == ("twilio", "completed", 1, 1)
    assert len(sms_charges(db, recent)) == 1 and sms_charges(db, old) == []  # 3 days old: outside 2d


# ---------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    ("sql", "field"),
    [
        ("SELECT * FROM api.twilio_reconciliation_candidates(%(stripe_run)s)", "run_id"),
        ("SELECT api.reconcile_twilio_message(%(run)s, '', '{}')", "message_sid"),
        ("SELECT api.reconcile_twilio_message(%(run)s, 'SM1', NULL)", "message"),
        ("SELECT api.reconcile_twilio_message(%(run)s, 'SM1', '{\"sid\": \"SM2\"}')", "message"),
    ],
)
def test_invalid_input_is_22023_naming_the_field(service, sql, field):
    runs = {
        name: service.execute(
            "SELECT api.start_reconciliation_run(%s, now() - interval '1 day', now()) AS r", (name,)
        ).fetchone()["r"]["run_id"]
        for name in ("stripe", "twilio")
    }
    with pytest.raises(psycopg.errors.InvalidParameterValue) as exc:
        service.execute(sql, {"stripe_run": runs["stripe"], "run": runs["twilio"]})
    assert exc.value.diag.column_name == field


def test_fake_speaks_twilios_documented_message_shape(fake_twilio):
    sid = payloads.twilio_sid("SM")
    fake_twilio.control("messages", [{"sid": sid, "status": "undelivered", "segments": 2}])
    url = f"{fake_twilio.url}/2010-04-01/Accounts/{TWILIO_ACCOUNT_SID}/Messages/{{}}.json"
    auth = (TWILIO_ACCOUNT_SID, SECRETS["twilio_auth_token"])

    message = requests.get(url.format(sid), auth=auth, timeout=10).json()
    assert set(message) == {
        "account_sid", "api_version", "body", "date_created", "date_sent", "date_updated", "direction",
        "error_code", "error_message", "from", "messaging_service_sid", "num_media", "num_segments",
        "price", "price_unit", "sid", "status", "subresource_uris", "to", "uri",
    }  # fmt: skip
    assert (message["status"], message["num_segments"], message["error_code"]) == ("undelivered", "2", 30003)
    assert parsedate_to_datetime(message["date_created"]).utcoffset() == timedelta(0)
    assert message["uri"] == f"/2010-04-01/Accounts/{TWILIO_ACCOUNT_SID}/Messages/{sid}.json"

    missing = requests.get(url.format("SM" + "0" * 32), auth=auth, timeout=10)
    assert missing.status_code == 404
    assert missing.json() | {"message": None} == {
        "code": 20404,
        "message": None,
        "more_info": "https://www.twilio.com/docs/errors/20404",
        "status": 404,
    }
    wrong = requests.get(url.format(sid), auth=(TWILIO_ACCOUNT_SID, "wrong"), timeout=10)
    assert (wrong.status_code, wrong.json()["code"]) == (401, 20003)


def test_a_poison_message_mid_run_is_recorded_and_the_messages_behind_it_are_settled(
    service, db, pool, fake_twilio, messages, org
):
    """A NUL in a Message field (PostgreSQL refuses \\u0000) is one unreadable discrepancy; the
    run goes on and settles the SMS after it."""
    sids = [send_sms(service, db, org, age=timedelta(hours=27 - i)) for i in range(3)]  # oldest first
    fake_twilio.control(
        "messages",
        [{"sid": sid, "status": "delivered"} for sid in sids[::2]]
        + [{"sid": sids[1], "status": "delivered", "to": "+1555\x000100400"}],
    )
    run = reconcile_twilio(pool, messages, SINCE)
    assert (run["status"], run["seen"], run["recovered"], run["unreadable"]) == ("completed", 3, 2, 1)
    assert fake_twilio.stats()["fetched"] == sids
    assert [c["provider_ref"] for c in sms_charges(db)] == [
        f"twilio:message:{sids[0]}",
        f"twilio:message:{sids[2]}",
    ]
    found = db.execute("SELECT * FROM billing.discrepancies WHERE kind = 'unreadable'").fetchone()
    assert (found["provider"], found["ref"]) == ("twilio", sids[1])
    assert found["evidence"]["error"].startswith("22P05")
    assert discrepancy(db, sids[1])["status"] == "open"  # still unsettled: an operator decides
