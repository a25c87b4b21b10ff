"""The shim under database faults answers right and recovers by itself (issue 13, item 3)."""

import json

import psycopg

from shim.fakes import payloads
from tests.db_helpers import open_wallet, route_assistant
from tests.senders import post_vapi


def test_a_read_only_database_is_503_and_pooled_sessions_recover_when_it_is_lifted(
    client, service, db, db_url
):
    """A database that takes no writes (default_transaction_read_only, as a standby after a
    failover) answers 503 with Retry-After, never 500. Sessions the pool opened meanwhile stayed
    read-only after it was lifted (31 more failures in 5 s, for up to their one-hour lifetime):
    now a session that met 25006 is closed, and the next request writes."""
    org = open_wallet(service, balance_minor=10_000)
    name = db.info.dbname
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, org), status="in-progress", started_at=None
    )
    message = payloads.vapi_status_update(call, "in-progress")
    db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    # Every pooled session now begins read-only.
    pool = client.application.extensions["creditledger.pool"]
    with pool.connection() as conn:
        conn.close()  # the session opened before the switch goes; new ones start read-only
    refused = [post_vapi(client, message) for _ in range(3)]
    assert {r.status_code for r in refused} == {503}
    assert all(r.headers.get("Retry-After") for r in refused)
    db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')

    answer = post_vapi(client, message)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert json.loads(answer.get_data())["status"] == "processed"
    with psycopg.connect(db_url) as fresh:  # a new session: nothing pooled, nothing cached
        assert fresh.execute("SELECT count(*) FROM billing.webhook_events").fetchone()[0] == 1


def test_a_killed_backend_is_replaced_at_checkout_not_answered_503(client, service, db):
    """pg_terminate_backend on the shim's connections (a restart, a failover) used to cost one
    503 per dead pooled connection (54 in 14 s under load): the pool now checks a connection at
    checkout and replaces a dead one."""
    org = open_wallet(service, balance_minor=10_000)
    assistant = route_assistant(service, org)
    first = payloads.vapi_status_update(
        payloads.vapi_call(assistant_id=assistant, status="in-progress", started_at=None), "in-progress"
    )
    assert post_vapi(client, first).status_code == 200  # the pool holds a live session now
    killed = db.execute(
        "SELECT count(*) AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS k"
    ).fetchone()["n"]
    assert killed >= 1
    for _ in range(3):
        message = payloads.vapi_status_update(
            payloads.vapi_call(assistant_id=assistant, status="in-progress", started_at=None), "in-progress"
        )
        assert post_vapi(client, message).status_code == 200
