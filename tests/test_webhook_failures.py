"""What the shim answers when the database fails: 503 so the provider retries, and never a
half-applied event."""

import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from shim.app import create_app
from shim.pool import open_pool
from tests.db_helpers import ledger_count, open_wallet, wallet
from tests.senders import paid_checkout, post_stripe, stripe_event
from tests.tcp_proxy import DatabaseProxy


@pytest.fixture
def proxied_client(db_url, shim_config):
    """The app reaching its database through a proxy the test can cut."""
    params = conninfo_to_dict(db_url)
    proxy = DatabaseProxy(params.get("host") or "localhost", int(params.get("port") or 5432))
    url = (
        f"postgresql://{params.get('user') or 'postgres'}:{params.get('password') or ''}"
        f"@127.0.0.1:{proxy.port}/{params['dbname']}"
    )
    pool = open_pool(url, max_size=2)
    pool.open(wait=True)
    try:
        yield create_app(shim_config, pool=pool).test_client(), proxy, pool
    finally:
        pool.close()
        proxy.close()


def test_database_unreachable_is_503_then_the_retry_applies_once(proxied_client, service, db):
    client, proxy, pool = proxied_client
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)

    proxy.cut()
    outage = post_stripe(client, event)
    assert outage.status_code == 503
    assert outage.headers["Retry-After"]
    assert ledger_count(db) == 0
    assert db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"] == 0

    proxy.restore()
    pool.check()  # drop the severed connections, as the pool does on its own schedule
    retried = post_stripe(client, event)
    assert retried.status_code == 200 and retried.json["result"]["status"] == "applied"
    assert post_stripe(client, event).json["status"] == "duplicate"
    assert wallet(db, org)["balance_minor"] == 2500


def test_connection_killed_between_storing_and_applying_leaves_neither(client, service, db, db_url):
    """The event row is inserted, then applying waits on the wallet lock another session holds;
    the shim's backend is terminated there. Store and apply are one transaction: neither
    survives, the provider gets a 503, and its retry is applied once."""
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)

    blocker = psycopg.connect(db_url)
    blocker.execute("SELECT 1 FROM billing.wallets WHERE org_id = %s FOR UPDATE", (org,))
    answers = []
    delivery = threading.Thread(target=lambda: answers.append(post_stripe(client, event)))
    delivery.start()

    # Bounded generously (a loaded machine may take seconds to get there); the time is not what
    # is tested. Only this test's database: pg_stat_activity spans the whole server.
    victim, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        victim = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%%api.ingest_webhook%%' "
            "AND wait_event_type = 'Lock' AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
        if victim:
            break
        time.sleep(0.025)
    assert victim, "the delivery never reached the wallet lock"
    stored_meanwhile = db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"]
    db.execute("SELECT pg_terminate_backend(%s)", (victim["pid"],))
    delivery.join(60)
    assert not delivery.is_alive(), "the delivery did not answer after its backend was terminated"
    blocker.rollback()
    blocker.close()

    assert stored_meanwhile == 0  # uncommitted: nobody else ever saw it
    assert answers[0].status_code == 503
    assert db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"] == 0
    assert ledger_count(db) == 0

    retried = post_stripe(client, event)
    assert retried.status_code == 200 and retried.json["result"]["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 2500


def test_applying_failure_is_stored_as_failed_and_answered_200(client, service, db):
    """An event that cannot apply yet (no wallet for its org) is ours to retry: 200, failed,
    with the error and a next attempt; after the maximum attempts it is dead."""
    import uuid

    org = uuid.uuid4()
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    answer = post_stripe(client, event)
    assert answer.status_code == 200 and answer.json["status"] == "failed"
    row = db.execute("SELECT * FROM billing.webhook_events").fetchone()
    assert row["status"] == "failed" and row["last_error"].startswith("P0002")
    assert row["next_attempt_at"] is not None

    db.execute("UPDATE billing.settings SET webhook_max_attempts = 3")
    for expected in ("failed", "dead"):
        db.execute("UPDATE billing.webhook_events SET next_attempt_at = now()")
        counts = service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"]
        assert counts == {expected: 1}
    dead = db.execute("SELECT * FROM billing.webhook_events").fetchone()
    assert dead["status"] == "dead" and dead["attempts"] == 3 and dead["next_attempt_at"] is None

    # The wallet is opened; an operator replays the dead letter; it applies once.
    open_wallet(service, org_id=org)
    service.execute("SELECT api.replay_webhook_event(%s)", (dead["id"],))
    assert service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"] == {"processed": 1}
    assert wallet(db, org)["balance_minor"] == 2500
