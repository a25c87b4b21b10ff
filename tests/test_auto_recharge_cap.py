"""Auto-recharge spend cap: at most the org's cap charged per rolling 24 hours, whatever the
debits, enforced in SQL under the lock that takes the claim; the customer is told once and the
AutoRechargeCapped alert says so."""

import uuid

import psycopg
import pytest

from shim.recharge import process_claims
from shim.stripe_client import make_client
from tests.db_helpers import as_user, notifications, one, open_wallet, snapshot, wallet
from tests.test_auto_recharge import CARD, CUSTOMER, claims, intents_created
from tests.test_concurrency import run_together

# The operator's maximums of issue 12: a $10,000 threshold and $2,000 per recharge.
THRESHOLD, AMOUNT = 1_000_000, 200_000
OPERATOR_DAILY_MAX = 500_000  # billing.settings.max_auto_recharge_daily_minor's default
CONNECTIONS = 12


def capped_org(service, db, balance=10_000, daily_cap=None, threshold=THRESHOLD, amount=AMOUNT):
    """An org far below a $10,000 threshold, auto-recharging $2,000, configured by its owner
    (with the 3-argument call when no cap is given)."""
    org = open_wallet(service, balance_minor=balance)
    service.execute("SELECT * FROM api.set_payment_method(%s, %s, %s)", (org, CUSTOMER, CARD))
    with as_user(db, org, "owner", commit=True) as conn:
        if daily_cap is None:
            conn.execute(
                "SELECT * FROM api.configure_auto_recharge(true, %s::bigint, %s::bigint)", (threshold, amount)
            )
        else:
            conn.execute(
                "SELECT * FROM api.configure_auto_recharge(true, %s::bigint, %s::bigint, %s::bigint)",
                (threshold, amount, daily_cap),
            )
    return org


def one_second_call(conn, org):
    return conn.execute(
        "SELECT * FROM api.deduct_call_credits(%s, %s, 1)", (org, f"call-{uuid.uuid4()}")
    ).fetchone()


def recharged(db, org) -> int:
    """What auto-recharge credited the org (its ledger entries of kind auto_recharge)."""
    return db.execute(
        "SELECT coalesce(sum(amount_minor), 0)::bigint AS n FROM billing.ledger_entries"
        " WHERE org_id = %s AND kind = 'auto_recharge'",
        (org,),
    ).fetchone()["n"]


def age_claims(db, org, hours):
    db.execute(
        "UPDATE billing.recharge_claims SET created_at = created_at - make_interval(hours => %s)"
        " WHERE org_id = %s",
        (hours, org),
    )


def test_issue_scenario_charges_at_most_the_cap_in_24_hours(
    db_url, service, db, shim_config, fake_stripe, pool
):
    """Issue 12's scenario: threshold $10,000, amount $2,000, every recharge still leaving the
    balance under the threshold. Eight rounds of one-second calls from 12 connections at once,
    the worker charging each round's claim in between (before: one $2,000 charge per round,
    $16,000). Now: $2,000 + $2,000 + the $1,000 the $5,000 cap leaves, then nothing, and one
    notification."""
    org = capped_org(service, db)
    stripe = make_client(shim_config)
    for _ in range(8):
        run_together(
            db_url, CONNECTIONS, lambda i, conn, barrier: (barrier.wait(), one_second_call(conn, org))
        )
        process_claims(pool, stripe)

    taken = claims(db, org)
    assert sum(c["amount_minor"] for c in taken) <= OPERATOR_DAILY_MAX
    assert [c["amount_minor"] for c in taken] == [200_000, 200_000, 100_000]
    assert all(c["status"] == "succeeded" for c in taken)
    assert recharged(db, org) == OPERATOR_DAILY_MAX
    assert intents_created(fake_stripe) == 3
    (note,) = notifications(db, org, "auto_recharge_capped")
    assert (note["details"]["daily_cap_minor"], note["details"]["charged_24h_minor"]) == (
        OPERATOR_DAILY_MAX,
        OPERATOR_DAILY_MAX,
    )
    assert wallet(db, org)["auto_recharge_capped_at"] is not None


def test_concurrent_debits_and_worker_never_pass_the_cap(db_url, service, db, shim_config, fake_stripe, pool):
    """Debits from 12 connections and the worker charging claims at the same time: whatever the
    interleaving, what was charged in 24 hours stays within the owner's $3,000 cap."""
    org = capped_org(service, db, daily_cap=300_000)
    stripe = make_client(shim_config)

    def work(index, conn, barrier):
        barrier.wait()
        for _ in range(15):
            if index == 0:
                process_claims(pool, stripe)
            else:
                one_second_call(conn, org)

    run_together(db_url, CONNECTIONS, work)
    process_claims(pool, stripe)
    for _ in range(3):  # whatever the interleaving left, the cap is reached now
        one_second_call(service, org)
        process_claims(pool, stripe)
    taken = claims(db, org)
    assert sum(c["amount_minor"] for c in taken if c["status"] != "failed") == 300_000
    assert recharged(db, org) == 300_000
    assert len(notifications(db, org, "auto_recharge_capped")) == 1


def test_cap_sizes_the_last_claim_down_and_refuses_below_the_smallest_top_up(service, db):
    """A cap of $2,500: one $2,000 claim, then one of the $500 it leaves, then none (what is left,
    0, is below min_top_up_minor)."""
    org = capped_org(service, db, daily_cap=250_000)
    for status in ("succeeded", "succeeded"):
        one_second_call(service, org)
        db.execute(
            "UPDATE billing.recharge_claims SET status = %s, settled_at = now() WHERE org_id = %s"
            " AND status = 'pending'",
            (status, org),
        )
    one_second_call(service, org)
    assert [c["amount_minor"] for c in claims(db, org)] == [200_000, 50_000]
    assert len(notifications(db, org, "auto_recharge_capped")) == 1
    one_second_call(service, org)
    assert len(notifications(db, org, "auto_recharge_capped")) == 1  # once, not once per debit


def test_failed_claims_do_not_count_against_the_cap(service, db):
    org = capped_org(service, db, daily_cap=200_000)
    one_second_call(service, org)
    db.execute(
        "UPDATE billing.recharge_claims SET status = 'failed', failure_code = 'card_declined',"
        " settled_at = now(), cooldown_until = now() - interval '1 second' WHERE org_id = %s",
        (org,),
    )
    one_second_call(service, org)
    assert [c["status"] for c in claims(db, org)] == ["failed", "pending"]
    assert notifications(db, org, "auto_recharge_capped") == []


def test_the_window_rolls_and_a_new_episode_is_notified_again(service, db):
    """24 hours after the claims, the cap is free again; reached again, the customer is told again."""
    org = capped_org(service, db, daily_cap=200_000)
    one_second_call(service, org)
    db.execute(
        "UPDATE billing.recharge_claims SET status = 'succeeded', settled_at = now() WHERE org_id = %s",
        (org,),
    )
    one_second_call(service, org)
    assert len(claims(db, org)) == 1 and len(notifications(db, org, "auto_recharge_capped")) == 1

    age_claims(db, org, 25)
    one_second_call(service, org)
    assert len(claims(db, org)) == 2
    assert wallet(db, org)["auto_recharge_capped_at"] is None
    db.execute(
        "UPDATE billing.recharge_claims SET status = 'succeeded', settled_at = now() WHERE org_id = %s"
        " AND status = 'pending'",
        (org,),
    )
    one_second_call(service, org)
    assert len(claims(db, org)) == 2
    assert len(notifications(db, org, "auto_recharge_capped")) == 2


def test_capped_wallet_fires_the_alert_until_the_window_moves_on(service, db):
    org = capped_org(service, db, daily_cap=200_000)
    one_second_call(service, org)
    db.execute(
        "UPDATE billing.recharge_claims SET status = 'succeeded', settled_at = now() WHERE org_id = %s",
        (org,),
    )
    alert = "SELECT firing, value FROM api.health_alerts() WHERE alert = 'AutoRechargeCapped'"
    assert one(service, alert) == {"firing": False, "value": 0}
    one_second_call(service, org)
    assert one(service, alert) == {"firing": True, "value": 1}
    db.execute(
        "UPDATE billing.wallets SET auto_recharge_capped_at = now() - interval '25 hours' WHERE org_id = %s",
        (org,),
    )
    assert one(service, alert) == {"firing": False, "value": 0}


# ---------------------------------------------------------------------------- configuring the cap


def test_owner_sets_the_cap_and_a_three_argument_call_keeps_it(service, db):
    org = capped_org(service, db, daily_cap=300_000)
    with as_user(db, org, "admin", commit=True) as conn:
        w = one(conn, "SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2500::bigint)")
    assert w["auto_recharge_daily_cap_minor"] == 300_000
    with as_user(db, org, "member") as conn:
        assert one(conn, "SELECT * FROM api.wallet_summary()")["auto_recharge_daily_cap_minor"] == 300_000


@pytest.mark.parametrize("cap", [0, 499, OPERATOR_DAILY_MAX + 1, -5])
def test_cap_outside_the_operator_bounds_is_invalid(service, db, cap):
    org = capped_org(service, db, balance=2_000_000)
    before = snapshot(db)
    with pytest.raises(psycopg.Error) as exc, as_user(db, org, "owner", commit=True) as conn:
        conn.execute(
            "SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2500::bigint, %s::bigint)", (cap,)
        )
    assert (exc.value.sqlstate, exc.value.diag.column_name) == ("22023", "daily_cap_minor")
    assert snapshot(db) == before


def test_lowering_the_operator_maximum_caps_every_org(service, db):
    """A cap an owner set earlier never exceeds the operator's maximum lowered since."""
    org = capped_org(service, db, balance=5_001, threshold=5_000, daily_cap=400_000)
    assert claims(db, org) == []
    db.execute("UPDATE billing.settings SET max_auto_recharge_daily_minor = 150000")
    one_second_call(service, org)
    assert [c["amount_minor"] for c in claims(db, org)] == [150_000]


def test_a_member_cannot_set_the_cap(service, db):
    org = capped_org(service, db, balance=2_000_000)
    before = snapshot(db)
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(db, org, "member", commit=True) as conn:
        conn.execute(
            "SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2500::bigint, 1000::bigint)"
        )
    assert snapshot(db) == before
