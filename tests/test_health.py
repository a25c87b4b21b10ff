"""Billing health: each alert produced for real, seen by SQL, /metrics and `creditledger health`."""

import uuid

import pytest

from shim.cli import main
from tests.db_helpers import open_wallet
from tests.senders import METRICS_AUTH, paid_checkout, post_stripe, stripe_event


def alerts(service) -> dict:
    rows = service.execute("SELECT * FROM api.health_alerts()").fetchall()
    return {(r["alert"], r["provider"]): r["firing"] for r in rows}


def firing(service) -> set:
    return {alert for (alert, _), on in alerts(service).items() if on}


def health_exit_code(monkeypatch, db_url, capsys) -> tuple[int, str]:
    monkeypatch.setenv("DATABASE_URL", db_url)
    code = main(["health"])
    return code, capsys.readouterr().out


def test_a_healthy_ledger_fires_nothing(service, monkeypatch, db_url, capsys, client):
    org = open_wallet(service, balance_minor=1000)
    session, _ = paid_checkout(org, 2500)
    post_stripe(client, stripe_event("checkout.session.completed", session))
    assert firing(service) == set()
    code, out = health_exit_code(monkeypatch, db_url, capsys)
    assert code == 0 and "all clear" in out


@pytest.mark.corrupts_ledger
def test_corrupted_balance_fires_the_invariant_alert(service, db, client, monkeypatch, db_url, capsys):
    org = open_wallet(service, balance_minor=1000)
    db.execute("UPDATE billing.wallets SET balance_minor = balance_minor + 1 WHERE org_id = %s", (org,))
    assert "LedgerInvariantViolated" in firing(service)
    metrics = client.get("/metrics", headers=METRICS_AUTH).get_data(as_text=True)
    assert 'creditledger_ledger_invariant_violations{provider=""} 1.0' in metrics
    assert 'creditledger_alert_firing{alert="LedgerInvariantViolated",provider=""} 1.0' in metrics
    code, out = health_exit_code(monkeypatch, db_url, capsys)
    assert code == 1 and "FIRING  LedgerInvariantViolated" in out


def test_events_that_stop_applying_fire_success_rate_and_backlog(service, db, client):
    """Events for an org with no wallet cannot apply: they pile up as failed."""
    for _ in range(3):
        session, _ = paid_checkout(uuid.uuid4(), 2500)
        assert (
            post_stripe(client, stripe_event("checkout.session.completed", session)).json["status"]
            == "failed"
        )
    assert alerts(service)[("WebhookSuccessRateLow", "stripe")]
    assert not alerts(service)[("WebhookBacklogStale", "stripe")]  # young backlog: not yet stale
    db.execute("UPDATE billing.webhook_events SET received_at = now() - interval '6 minutes'")
    assert alerts(service)[("WebhookBacklogStale", "stripe")]
    metrics = client.get("/metrics", headers=METRICS_AUTH).get_data(as_text=True)
    assert 'creditledger_webhook_backlog{provider="stripe"} 3.0' in metrics


def test_dead_letter_fires_until_replayed(service, db, client):
    org = uuid.uuid4()
    session, _ = paid_checkout(org, 2500)
    post_stripe(client, stripe_event("checkout.session.completed", session))
    db.execute("UPDATE billing.settings SET webhook_max_attempts = 1")
    db.execute("UPDATE billing.webhook_events SET next_attempt_at = now()")
    service.execute("SELECT api.retry_webhook_events(10)")
    assert alerts(service)[("WebhookDeadLetters", "stripe")]

    open_wallet(service, org_id=org)
    event_id = db.execute("SELECT id FROM billing.webhook_events").fetchone()["id"]
    service.execute("SELECT api.replay_webhook_event(%s)", (event_id,))
    service.execute("SELECT api.retry_webhook_events(10)")
    assert not alerts(service)[("WebhookDeadLetters", "stripe")]


def test_stale_reconciliation_fires_only_once_owed(service, db):
    open_wallet(service, balance_minor=1000)
    assert not alerts(service)[("ReconciliationStale", "stripe")]  # a new ledger owes none yet
    db.execute("ALTER TABLE billing.ledger_entries DISABLE TRIGGER ledger_entries_append_only")
    db.execute("UPDATE billing.ledger_entries SET created_at = now() - interval '27 hours'")
    db.execute("ALTER TABLE billing.ledger_entries ENABLE TRIGGER ledger_entries_append_only")
    assert alerts(service)[("ReconciliationStale", "stripe")]
    db.execute(
        "INSERT INTO billing.reconciliation_runs (provider, window_start, window_end, status, finished_at) "
        "VALUES ('stripe', now() - interval '7 days', now(), 'completed', now())"
    )
    assert not alerts(service)[("ReconciliationStale", "stripe")]
    assert alerts(service)[("ReconciliationStale", "vapi")]


def test_a_claim_stripe_has_not_accepted_for_half_an_hour_fires_recharge_claims_stuck(service, db):
    org = open_wallet(service, balance_minor=1000)
    db.execute(
        "INSERT INTO billing.recharge_claims (org_id, amount_minor, currency, status, idempotency_key,"
        " created_at) VALUES (%s, 2000, 'usd', 'pending', 'fresh', now() - interval '29 minutes')",
        (org,),
    )
    assert not alerts(service)[("RechargeClaimsStuck", "stripe")]
    db.execute("UPDATE billing.recharge_claims SET created_at = now() - interval '31 minutes'")
    assert alerts(service)[("RechargeClaimsStuck", "stripe")]
    # Stripe accepted it and is processing a bank debit: days are normal, nothing fires.
    db.execute("UPDATE billing.recharge_claims SET payment_intent_id = 'pi_BankDebit01'")
    assert not alerts(service)[("RechargeClaimsStuck", "stripe")]


def test_low_balance_notifies_once_per_crossing(service, db):
    org = open_wallet(service, balance_minor=1000)
    service.execute("SELECT * FROM api.set_low_balance_threshold(%s, 500)", (org,))
    for i in range(8):  # 8 x 70: crosses 500 once, then stays below
        service.execute("SELECT api.deduct_call_credits(%s, %s, 60)", (org, f"call-{i}"))
    service.execute("SELECT api.add_wallet_credits(%s, 1000, 'refill')", (org,))
    service.execute("SELECT api.deduct_call_credits(%s, 'call-again', 1200)", (org,))  # 1440 -> 40: again
    rows = service.execute("SELECT * FROM api.pending_notifications(10)").fetchall()
    assert [r["kind"] for r in rows] == ["low_balance", "low_balance"]
    assert (
        service.execute(
            "SELECT api.mark_notifications_delivered(%s) AS n", ([r["id"] for r in rows],)
        ).fetchone()["n"]
        == 2
    )
    assert service.execute("SELECT * FROM api.pending_notifications(10)").fetchall() == []


def test_metrics_say_the_database_is_down_instead_of_failing(shim_config):
    import dataclasses

    from shim.app import create_app
    from shim.pool import open_pool

    pool = open_pool("postgresql://nobody@127.0.0.1:9/none?connect_timeout=1", max_size=1)
    pool.timeout = 0.5
    app = create_app(dataclasses.replace(shim_config), pool=pool)
    text = app.test_client().get("/metrics", headers=METRICS_AUTH).get_data(as_text=True)
    assert "creditledger_database_up 0.0" in text
    assert app.test_client().get("/healthz").status_code == 503
