"""The shim's paths the rest of the suite never reached (pytest-cov --cov=shim), each tested for
the answer it gives and for what it leaves in the database:

- webhook and top-up requests refused before any SQL runs (400, nothing stored);
- a top-up whose session another request is still creating (503), and a caller whose role may
  not top up (403, from the SQL function's 42501);
- the `creditledger` commands not run elsewhere in-process: reconcile, worker --once, serve,
  health against a database that is down, and the worker loop surviving a failed pass.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

import shim.cli as cli
import shim.topups as topups
import shim.worker as worker
from shim.app import create_app
from shim.cli import main
from shim.fakes import payloads
from shim.reconcile import parse_since
from tests.conftest import SECRETS
from tests.db_helpers import as_user, ledger_count, open_wallet, route_assistant, wallet
from tests.jwt_tokens import bearer, supabase_token
from tests.senders import TWILIO_PATH, paid_checkout, post_stripe, post_twilio, post_vapi, stripe_event

NOW = datetime.now(UTC)


def stored_events(db) -> int:
    return db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"]


# ---------------------------------------------------------------------------- webhooks refused


def test_stripe_event_without_a_type_is_400_and_stores_nothing(client, db):
    answer = post_stripe(client, {"id": "evt_no_type", "object": "event", "data": {"object": {}}})
    assert answer.status_code == 400
    assert answer.json == {"error": "bad_request", "message": "a Stripe event has an id and a type"}
    assert stored_events(db) == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body is not JSON"),
        (b"[1, 2, 3]", "body is not a JSON object"),
        (
            json.dumps({"message": {"call": {"id": "call-1"}}}).encode(),
            "a Vapi server message has message.type",
        ),
        (json.dumps({"message": "end-of-call-report"}).encode(), "a Vapi server message has message.type"),
    ],
)
def test_vapi_body_that_is_not_a_server_message_is_400(client, db, body, message):
    answer = client.post(
        "/webhooks/vapi",
        data=body,
        content_type="application/json",
        headers={"X-Vapi-Secret": SECRETS["vapi_webhook_secret"]},
    )
    assert answer.status_code == 400 and answer.json["error"] == "bad_request"
    assert answer.json["message"].startswith(message)
    assert stored_events(db) == 0


def test_vapi_message_without_a_call_is_identified_by_its_bytes(client, db):
    """A message type with no call id has no natural id: the same bytes redelivered are a
    duplicate; the same message with other bytes is another event."""
    message = {"message": {"type": "hang", "timestamp": 1_700_000_000_000}}
    first = post_vapi(client, message)
    assert first.status_code == 200 and first.json["status"] == "ignored"
    digest = hashlib.sha256(json.dumps(message).encode()).hexdigest()
    row = db.execute("SELECT * FROM billing.webhook_events").fetchone()
    assert row["event_id"] == f"hang:sha256:{digest}" and row["event_type"] == "hang"
    assert row["result"]["note"] == "no_call"
    again = post_vapi(client, message)
    assert again.json["status"] == "duplicate" and again.json["event_row_id"] == row["id"]
    post_vapi(client, {"message": {"type": "hang", "timestamp": 1_700_000_000_001}})
    assert stored_events(db) == 2


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({}, "missing X-Vapi-Secret or x-signature/x-timestamp"),
        ({"x-signature": "00" * 32, "x-timestamp": "soon"}, "x-timestamp is not a number"),
    ],
)
def test_vapi_without_a_usable_credential_is_400_bad_signature(client, db, headers, problem):
    answer = client.post(
        "/webhooks/vapi",
        data=b'{"message": {"type": "hang"}}',
        content_type="application/json",
        headers=headers,
    )
    assert answer.status_code == 400
    assert answer.json == {"error": "bad_signature", "message": problem}
    assert stored_events(db) == 0


def test_twilio_callback_without_a_signature_is_400(client, db):
    params = payloads.twilio_status_callback(
        message_sid=payloads.twilio_sid("SM"),
        status="sent",
        account_sid="AC" + "0" * 32,
        from_="+15550000001",
        to="+15550000002",
    )
    answer = client.post(TWILIO_PATH, data=params)
    assert answer.status_code == 400
    assert answer.json == {"error": "bad_signature", "message": "missing X-Twilio-Signature header"}
    assert stored_events(db) == 0


def test_signed_twilio_callback_without_a_status_is_400(client, db):
    answer = post_twilio(client, {"MessageSid": payloads.twilio_sid("SM"), "AccountSid": "AC" + "0" * 32})
    assert answer.status_code == 400
    assert answer.json["message"] == "a status callback has MessageSid and MessageStatus"
    assert stored_events(db) == 0


# ---------------------------------------------------------------------------- top-ups refused


def top_up_raw(client, org, **kwargs):
    return client.post("/top-ups", headers=bearer(supabase_token(org)), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"data": b"amount=2500", "content_type": "application/x-www-form-urlencoded"},
            "body must be a JSON object",
        ),
        ({"json": [2500]}, "body must be a JSON object"),
        (
            {"json": {"amount_minor": "2500", "client_request_id": str(uuid.uuid4())}},
            "amount_minor must be an integer number of minor units",
        ),
        (
            {"json": {"amount_minor": True, "client_request_id": str(uuid.uuid4())}},
            "amount_minor must be an integer number of minor units",
        ),
        (
            {"json": {"amount_minor": 2500.5, "client_request_id": str(uuid.uuid4())}},
            "amount_minor must be an integer number of minor units",
        ),
        (
            {"json": {"amount_minor": 2500, "client_request_id": "order-17"}},
            "client_request_id must be a uuid",
        ),
        ({"json": {"amount_minor": 2500}}, "client_request_id must be a uuid"),
    ],
)
def test_top_up_body_that_is_not_a_request_is_400(client, service, db, fake_stripe, kwargs, message):
    org = open_wallet(service)
    answer = top_up_raw(client, org, **kwargs)
    assert answer.status_code == 400
    assert answer.json == {"error": "bad_request", "message": message}
    assert db.execute("SELECT count(*) AS n FROM billing.checkout_requests").fetchone()["n"] == 0
    assert "POST /v1/checkout/sessions" not in fake_stripe.stats()["endpoints"]


def test_top_up_while_another_request_creates_the_session_is_503(
    client, service, db, fake_stripe, monkeypatch
):
    """The lease holder is still talking to Stripe: this request waits (here: not at all) and
    then answers 503 so the client retries; it never creates a second session."""
    org = open_wallet(service)
    request_id = uuid.uuid4()
    with as_user(db, org, "owner", commit=True) as conn:  # the first request, mid-creation
        first = conn.execute("SELECT api.begin_checkout(2500::bigint, %s) AS a", (request_id,)).fetchone()[
            "a"
        ]
    assert first["status"] == "create"
    monkeypatch.setattr(topups, "PENDING_WAIT_SECONDS", 0.0)
    answer = top_up_raw(client, org, json={"amount_minor": 2500, "client_request_id": str(request_id)})
    assert answer.status_code == 503
    assert answer.json["error"] == "in_progress"
    row = db.execute("SELECT * FROM billing.checkout_requests").fetchone()
    assert row["status"] == "creating" and row["session_id"] is None
    assert "POST /v1/checkout/sessions" not in fake_stripe.stats()["endpoints"]


def test_top_up_by_a_role_that_may_not_pay_is_403(client, service, db, fake_stripe):
    org = open_wallet(service)
    answer = client.post(
        "/top-ups",
        json={"amount_minor": 2500, "client_request_id": str(uuid.uuid4())},
        headers=bearer(supabase_token(org, org_role="viewer")),
    )
    assert answer.status_code == 403
    assert answer.json == {"error": "forbidden", "message": "caller is not a member of the organisation"}
    assert db.execute("SELECT count(*) AS n FROM billing.checkout_requests").fetchone()["n"] == 0


# ---------------------------------------------------------------------------- the app without a pool


def test_app_built_without_a_pool_opens_its_own(shim_config, service, db):
    app = create_app(shim_config)
    try:
        client = app.test_client()
        assert client.get("/healthz").status_code == 200
        org = open_wallet(service)
        session, _ = paid_checkout(org, 2500)
        assert post_stripe(client, stripe_event("checkout.session.completed", session)).status_code == 200
        assert wallet(db, org)["balance_minor"] == 2500
    finally:
        app.extensions["creditledger.pool"].close()


# ---------------------------------------------------------------------------- the command line


@pytest.fixture
def cli_env(monkeypatch, db_url):
    """The environment a command runs with: this test's database and no provider configured."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    for name in ("STRIPE_API_KEY", "STRIPE_API_BASE", "VAPI_API_KEY", "VAPI_API_BASE", "TWILIO_ACCOUNT_SID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("24h", timedelta(hours=24)),
        (" 90m ", timedelta(minutes=90)),
        ("30s", timedelta(seconds=30)),
    ],
)
def test_since_takes_a_number_and_a_unit(text, expected):
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["7", "d", "1w", "-1d", "1.5h", "1d2h"])
def test_since_without_a_known_unit_is_refused(text):
    with pytest.raises(ValueError, match="--since takes a number and a unit"):
        parse_since(text)


def test_reconcile_command_charges_the_calls_the_ledger_lacks(cli_env, service, db, fake_vapi, capsys):
    org = open_wallet(service, balance_minor=10_000)
    start = NOW - timedelta(hours=1)
    calls = [
        payloads.vapi_call(
            assistant_id=route_assistant(service, org),
            started_at=start + timedelta(seconds=i),
            ended_at=start + timedelta(seconds=i + 60),
            updated_at=start + timedelta(seconds=i + 61),
        )
        for i in range(2)
    ]
    old = payloads.vapi_call(
        assistant_id=route_assistant(service, org),
        started_at=NOW - timedelta(hours=5),
        ended_at=NOW - timedelta(hours=5) + timedelta(seconds=60),
        updated_at=NOW - timedelta(hours=5) + timedelta(seconds=61),
    )
    fake_vapi.control("calls", [*calls, old])
    cli_env.setenv("VAPI_API_KEY", "vapi-test-api-key")
    cli_env.setenv("VAPI_API_BASE", fake_vapi.url)

    assert main(["reconcile", "vapi", "--since", "2h"]) == 0
    run = json.loads(capsys.readouterr().out)
    # The 5-hour-old call is outside the window.
    assert (run["status"], run["seen"], run["recovered"]) == ("completed", 2, 2)
    assert wallet(db, org)["balance_minor"] == 10_000 - 2 * 70
    charged = {
        r["provider_ref"]
        for r in db.execute(
            "SELECT provider_ref FROM billing.ledger_entries WHERE kind = 'call_charge'"
        ).fetchall()
    }
    assert charged == {f"vapi:call:{c['id']}" for c in calls}


def test_reconcile_resume_without_a_failed_run_says_so(cli_env, db):
    with pytest.raises(LookupError, match="no failed stripe reconciliation run to resume"):
        main(["reconcile", "stripe", "--resume"])
    assert db.execute("SELECT count(*) AS n FROM billing.reconciliation_runs").fetchone()["n"] == 0


def test_worker_once_retries_due_events_and_skips_what_is_not_configured(cli_env, service, db, capsys):
    org = uuid.uuid4()  # its wallet is opened after its payment arrived
    event = stripe_event("checkout.session.completed", paid_checkout(org, 2500)[0])
    stored = service.execute(
        "SELECT api.ingest_webhook('stripe', %s, %s, %s::jsonb) AS a",
        (event["id"], event["type"], json.dumps(event)),
    ).fetchone()["a"]
    assert stored["status"] == "failed"
    open_wallet(service, org_id=org)
    db.execute("UPDATE billing.webhook_events SET next_attempt_at = now()")

    assert main(["worker", "--once"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["webhooks_retried"] == {"processed": 1}
    assert report["holds_expired"] == 0
    assert report["recharges"] == "skipped: STRIPE_API_KEY is not set"
    assert report["reconciliation"] == {
        "stripe": "skipped: not configured",
        "vapi": "skipped: not configured",
        "twilio": "skipped: not configured",
    }
    assert wallet(db, org)["balance_minor"] == 2500 and ledger_count(db, org) == 1


@pytest.mark.parametrize(("workers", "shares_metrics"), [(3, True), (1, False)])
def test_serve_execs_gunicorn_on_the_port(cli_env, workers, shares_metrics):
    cli_env.setenv("PROMETHEUS_MULTIPROC_DIR", "placeholder")  # so that the delenv below is undone
    cli_env.delenv("PROMETHEUS_MULTIPROC_DIR")
    execs = []
    cli_env.setattr(cli.os, "execvp", lambda file, argv: execs.append((file, argv)))
    assert main(["serve", "--port", "9137", "--workers", str(workers), "--threads", "4"]) == 0
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        shutil.rmtree(metrics_dir)
    ((file, argv),) = execs
    assert file == sys.executable
    assert argv[:4] == [sys.executable, "-m", "gunicorn", "shim.app:create_app()"]
    assert argv[argv.index("--bind") + 1] == "0.0.0.0:9137"
    assert argv[argv.index("--workers") + 1] == str(workers)
    assert argv[argv.index("--threads") + 1] == "4"
    if shares_metrics:  # one directory for every worker's samples, fresh for this start
        assert os.path.basename(metrics_dir).startswith("creditledger-metrics-")
    else:
        assert metrics_dir is None


def test_health_of_an_unreachable_database_exits_2(cli_env, capsys):
    cli_env.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:9/postgres?connect_timeout=1")
    assert main(["health"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("billing database unreachable:")


def test_worker_loop_survives_a_failing_pass(monkeypatch, caplog):
    config = object()  # handed through to each pass untouched
    passes, sleeps = [], []

    def run_once(pool, config):
        passes.append(config)
        if len(passes) == 1:
            raise ConnectionError("database restarting")
        return {"webhooks_retried": {}}

    class Stop(Exception):
        pass

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise Stop

    monkeypatch.setattr(worker, "run_once", run_once)
    monkeypatch.setattr(worker.time, "sleep", sleep)
    with caplog.at_level(logging.INFO, logger="shim.worker"), pytest.raises(Stop):
        worker.run_forever(None, config, interval_seconds=2.0)
    assert len(passes) == 2 and all(c is config for c in passes)
    assert all(0.0 <= s <= 2.0 for s in sleeps)
    messages = [r.getMessage() for r in caplog.records]
    assert "worker pass failed" in messages
    assert "worker pass: {'webhooks_retried': {}}" in messages
    failed = next(r for r in caplog.records if r.getMessage() == "worker pass failed")
    assert failed.exc_info and isinstance(failed.exc_info[1], ConnectionError)
