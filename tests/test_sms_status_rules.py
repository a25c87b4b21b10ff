"""Every Twilio message status has a money rule (charged, released or still in flight), taken
from Twilio's own billing, and the status callback and Twilio reconciliation apply the same one.

Twilio support, "Will I be charged if Twilio encounters an error when sending an SMS?": Twilio
charges "if delivery was attempted, i.e. the message status is sent, delivered, undelivered, or
delivery unknown"; a "failed" message "did not leave Twilio and you will not be charged".
"""

from datetime import timedelta

import pytest
from twilio.rest.api.v2010.account.message import MessageInstance

from shim.reconcile import reconcile_twilio
from tests.db_helpers import hold_row, ledger_count, one, open_wallet, wallet
from tests.test_reconciliation_twilio import SINCE, messages, send_sms  # noqa: F401 (fixture)
from tests.test_sms_holds import REGISTER, sms_status

# The rule per status, written here from Twilio's documentation (not read back from SQL), so a
# change of the rule in SQL, or a status twilio-python adds, fails a test.
EXPECTED = {
    "accepted": "in_flight",
    "scheduled": "in_flight",
    "queued": "in_flight",
    "sending": "in_flight",
    "receiving": "in_flight",
    "sent": "charged",
    "delivered": "charged",
    "undelivered": "charged",
    "partially_delivered": "charged",
    "read": "charged",
    "received": "charged",
    "failed": "released",
    "canceled": "released",
}


def twilio_statuses() -> list[str]:
    """The statuses of the installed twilio-python's MessageInstance.Status (a plain class of
    string constants, not an Enum)."""
    status = MessageInstance.Status
    return sorted(getattr(status, name) for name in vars(status) if name.isupper())


def test_every_status_twilio_defines_has_a_rule(db):
    statuses = twilio_statuses()
    assert "partially_delivered" in statuses  # the package is the one this was written against
    assert set(statuses) == set(EXPECTED), "a Twilio status without a documented rule"
    in_sql = {r["status"]: r["rule"] for r in db.execute("SELECT * FROM billing._sms_statuses()")}
    assert in_sql == EXPECTED


@pytest.mark.parametrize("status", twilio_statuses())
def test_status_callback_applies_the_rule(service, db, status):
    """One callback with this status: charged takes the held cost, released frees it, in flight
    keeps the hold open. Never stored as ignored."""
    org = open_wallet(service, balance_minor=1000, sms_segment_minor=4)
    one(service, REGISTER, (org, "SM1", 3))
    r = sms_status(service, "SM1", status)  # asserts the event was processed, not ignored
    w, hold = wallet(db, org), hold_row(db, "SM1", "sms")
    rule = EXPECTED[status]
    if rule == "charged":
        assert (r["status"], r["amount_minor"]) == ("applied", -12)
        assert (w["balance_minor"], w["held_minor"], hold["status"]) == (988, 0, "captured")
        assert ledger_count(db, org) == 2
    elif rule == "released":
        assert (r["status"], r["amount_minor"]) == ("applied", 12)
        assert (w["balance_minor"], w["held_minor"], hold["status"]) == (1000, 0, "released")
        assert ledger_count(db, org) == 1
    else:
        assert r["status"] == "applied"
        assert (w["balance_minor"], w["held_minor"], hold["status"]) == (1000, 12, "open")
        assert hold["provider_status"] == status


def test_sent_then_undelivered_is_charged_once(service, db):
    """Twilio bills an undelivered message (delivery was attempted): the charge taken at sent
    stands, and an undelivered first is charged too."""
    org = open_wallet(service, balance_minor=1000, sms_segment_minor=4)
    one(service, REGISTER, (org, "SM1", 1))
    one(service, REGISTER, (org, "SM2", 1))
    assert sms_status(service, "SM1", "sent")["status"] == "applied"
    assert sms_status(service, "SM1", "undelivered")["status"] == "duplicate"
    assert sms_status(service, "SM2", "undelivered")["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 1000 - 2 * 4
    assert ledger_count(db, org) == 3


def test_partially_delivered_settles_and_a_late_status_changes_nothing(service, db):
    org = open_wallet(service, balance_minor=1000, sms_segment_minor=4)
    one(service, REGISTER, (org, "SM1", 2))
    sms_status(service, "SM1", "sending")
    assert sms_status(service, "SM1", "partially_delivered")["status"] == "applied"
    for late in ["sent", "delivered", "failed"]:
        assert sms_status(service, "SM1", late)["status"] == "duplicate"
    assert (wallet(db, org)["balance_minor"], wallet(db, org)["held_minor"]) == (992, 0)


@pytest.mark.parametrize("status", twilio_statuses())
def test_reconciliation_applies_the_same_rule(service, db, pool, fake_twilio, messages, status):  # noqa: F811
    """An SMS whose callbacks were lost, as Twilio's Message resource reports it: charged and
    released settle it (its unsettled_sms discrepancy resolved), in flight keeps it open."""
    org = open_wallet(service, balance_minor=1000, sms_segment_minor=3)
    sid = send_sms(service, db, org, age=timedelta(hours=25))
    fake_twilio.control("messages", [{"sid": sid, "status": status}])
    run = reconcile_twilio(pool, messages, SINCE)
    assert run["seen"] == 1
    charges = db.execute(
        "SELECT amount_minor FROM billing.ledger_entries WHERE provider_ref = %s", (f"twilio:message:{sid}",)
    ).fetchall()
    (d,) = db.execute(
        "SELECT status FROM billing.discrepancies WHERE kind = 'unsettled_sms' AND ref = %s", (sid,)
    ).fetchall()
    rule = EXPECTED[status]
    assert charges == ([{"amount_minor": -3}] if rule == "charged" else [])
    assert d["status"] == ("open" if rule == "in_flight" else "resolved")
    assert wallet(db, org)["balance_minor"] == (997 if rule == "charged" else 1000)
