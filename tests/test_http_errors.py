"""Every SQLSTATE class the shim can meet has a deliberate HTTP answer (shim/http_errors.py), seen
through the real stack: PostgreSQL raises the code, psycopg carries it, the app answers JSON.
POST /top-ups's own cases (issue 12, item 3) used to answer 500."""

import uuid

import psycopg
import pytest

from shim.http_errors import SQLSTATE_ANSWERS, sqlstate_answer
from shim.retry import with_connection
from tests.db_helpers import open_wallet, wallet
from tests.jwt_tokens import bearer, supabase_token
from tests.senders import paid_checkout, post_stripe, stripe_event
from tests.tcp_proxy import DatabaseProxy

# (SQLSTATE raised in the database, HTTP status, error code, Retry-After)
CASES = [
    ("22023", 400, "invalid_parameter", None),  # our own RAISE naming the field
    ("22P02", 400, "invalid_parameter", None),  # a uuid cast
    ("22003", 400, "invalid_parameter", None),  # a bigint cast
    ("22P05", 400, "invalid_parameter", None),  # \u0000 in jsonb
    ("23505", 409, "conflict", None),
    ("23503", 409, "conflict", None),
    ("23514", 400, "invalid_parameter", None),
    ("54001", 400, "input_too_complex", None),
    ("42501", 403, "forbidden", None),
    ("P0002", 409, "not_found", None),
    ("PT402", 402, "insufficient_funds", None),
    ("08006", 503, "database_unavailable", "5"),
    ("28000", 503, "database_unavailable", "5"),
    ("3D000", 503, "database_unavailable", "5"),
    ("58030", 503, "database_unavailable", "5"),
    ("40001", 503, "database_busy", "1"),  # only once the retries ran out
    ("40P01", 503, "database_busy", "1"),
    ("53300", 503, "database_unavailable", "5"),
    ("55P03", 503, "database_busy", "1"),
    ("57014", 503, "database_unavailable", "5"),
    ("25006", 503, "database_unavailable", "5"),
    ("42883", 503, "schema_not_ready", "30"),
    ("42P01", 503, "schema_not_ready", "30"),
    ("3F000", 503, "schema_not_ready", "30"),
    ("42601", 500, "internal_error", None),  # a syntax error: our defect
    ("P0001", 500, "internal_error", None),  # a RAISE without a code: our defect
    ("XX000", 500, "internal_error", None),
]


@pytest.fixture
def raising_app(shim_app):
    """The app with one more route that makes PostgreSQL raise a given SQLSTATE, in a function
    called the way the shim calls api.* (through shim.retry.with_connection)."""

    @shim_app.get("/_test/raise/<sqlstate>")
    def raise_sqlstate(sqlstate):
        pool = shim_app.extensions["creditledger.pool"]
        statement = (
            f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', MESSAGE = 'raised {sqlstate}',"
            " COLUMN = 'some_field'; END $$"
        )
        with_connection(pool, lambda conn: conn.execute(statement))
        return {"unreachable": True}

    return shim_app


@pytest.mark.parametrize(("sqlstate", "status", "error", "retry_after"), CASES)
def test_each_sqlstate_has_its_answer(raising_app, sqlstate, status, error, retry_after):
    answer = raising_app.test_client().get(f"/_test/raise/{sqlstate}")
    assert (answer.status_code, answer.json["error"]) == (status, error)
    assert answer.headers.get("Retry-After") == retry_after
    assert answer.json["message"]
    if status < 500:  # the client's own fault: the message and the field the SQL named
        assert answer.json["message"] == f"raised {sqlstate}"
        assert answer.json["field"] == "some_field"
    else:  # the server's: what to do, never what the database said
        assert sqlstate not in answer.get_data(as_text=True)
        assert "field" not in answer.json


def test_every_entry_of_the_table_is_exercised():
    """An entry added to SQLSTATE_ANSWERS without a case above fails here."""
    raised = {code for code, *_ in CASES}
    assert {key for key in SQLSTATE_ANSWERS if not any(code.startswith(key) for code in raised)} == set()
    assert all(sqlstate_answer(code)[:2] == (status, error) for code, status, error, _ in CASES)


# ---------------------------------------------------------------------- retries


def test_a_serialization_failure_is_retried_and_the_retry_answers(shim_app, db):
    """40001/40P01 roll the whole transaction back; the shim runs it again on a fresh checkout."""
    pool = shim_app.extensions["creditledger.pool"]
    db.execute("CREATE TABLE attempts (n integer)")
    db.execute("GRANT ALL ON attempts TO PUBLIC")
    failures = iter(["40001", "40P01"])

    def work(conn):
        with conn.transaction():
            conn.execute("INSERT INTO attempts VALUES (1)")
            code = next(failures, None)
            if code:
                conn.execute(f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}'; END $$")
            return conn.execute("SELECT count(*) AS n FROM attempts").fetchone()["n"]

    # Each failed attempt's INSERT was rolled back with it: the third sees only its own row.
    assert with_connection(pool, work) == 1
    assert db.execute("SELECT count(*) AS n FROM attempts").fetchone()["n"] == 1


def test_a_deadlock_while_storing_a_webhook_is_retried_and_credits_once(client, service, db):
    """The inbox insert is chosen as a deadlock victim once (a trigger counting on a sequence,
    which a rollback does not rewind): the shim stores the event on its second attempt and
    answers 200, instead of 503 to a provider that may not retry (Vapi, by default)."""
    db.execute("CREATE SEQUENCE public.ingest_attempts")
    db.execute(
        "CREATE FUNCTION public.deadlock_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF nextval('public.ingest_attempts') = 1 THEN"
        " RAISE EXCEPTION USING ERRCODE = '40P01', MESSAGE = 'deadlock detected (test)'; END IF;"
        " RETURN NEW; END $$"
    )
    db.execute(
        "CREATE TRIGGER deadlock_once BEFORE INSERT ON billing.webhook_events"
        " FOR EACH ROW EXECUTE FUNCTION public.deadlock_once()"
    )
    db.execute("GRANT USAGE ON SEQUENCE public.ingest_attempts TO PUBLIC")
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    answer = post_stripe(client, stripe_event("checkout.session.completed", session))
    assert answer.status_code == 200 and answer.json["status"] == "processed"
    assert db.execute("SELECT last_value FROM public.ingest_attempts").fetchone()["last_value"] == 2
    assert wallet(db, org)["balance_minor"] == 2500


def test_retries_are_bounded(shim_app):
    pool = shim_app.extensions["creditledger.pool"]
    calls = []

    def always_deadlocks(conn):
        calls.append(1)
        conn.execute("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01'; END $$")

    with pytest.raises(psycopg.errors.DeadlockDetected):
        with_connection(pool, always_deadlocks, attempts=3)
    assert len(calls) == 3


def test_a_connection_lost_mid_request_is_503_with_retry_after(shim_config, service):
    """The database goes away while the shim holds a pooled connection: 503 and Retry-After,
    so the caller retries, never a 500."""
    import dataclasses

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from shim.app import create_app
    from shim.pool import open_pool

    org = open_wallet(service)
    params = conninfo_to_dict(shim_config.database_url)
    proxy = DatabaseProxy(params.get("host") or "localhost", int(params.get("port") or 5432))
    url = make_conninfo(**(params | {"host": "127.0.0.1", "port": str(proxy.port)}))
    pool = open_pool(url, max_size=1)
    pool.timeout = 1.0
    pool.open(wait=True)
    try:
        app = create_app(dataclasses.replace(shim_config, database_url=url), pool=pool)
        proxy.cut()  # the pooled connection dies under the request
        answer = app.test_client().post(
            "/top-ups",
            json={"amount_minor": 2500, "client_request_id": str(uuid.uuid4())},
            headers=bearer(supabase_token(org)),
        )
    finally:
        pool.close()
        proxy.close()
    assert answer.status_code == 503
    assert answer.json["error"] == "database_unavailable"
    assert answer.headers["Retry-After"] == "5"


# ---------------------------------------------------------------------- POST /top-ups (item 3)


def top_up(client, token, body):
    return client.post("/top-ups", json=body, headers=bearer(token))


def nothing_requested(db) -> bool:
    return db.execute("SELECT count(*) AS n FROM billing.checkout_requests").fetchone()["n"] == 0


@pytest.mark.parametrize("amount", [2**63, 2**63 + 1, 2**64, 10**30, -(2**63) - 1])
def test_top_up_amount_past_bigint_is_400_naming_it(client, service, db, amount):
    """Was 500: the ::bigint cast raised 22003."""
    org = open_wallet(service)
    answer = top_up(
        client, supabase_token(org), {"amount_minor": amount, "client_request_id": str(uuid.uuid4())}
    )
    assert answer.status_code == 400
    assert answer.json["field"] == "amount_minor"
    assert nothing_requested(db)


def test_top_up_amount_at_the_bigint_limit_reaches_sql_and_is_400_from_its_bounds(client, service, db):
    org = open_wallet(service)
    body = {"amount_minor": 2**63 - 1, "client_request_id": str(uuid.uuid4())}
    answer = top_up(client, supabase_token(org), body)
    assert answer.status_code == 400
    assert (answer.json["error"], answer.json["field"]) == ("invalid_parameter", "amount_minor")
    assert nothing_requested(db)


@pytest.mark.parametrize("sub", ["user-42", "", "urn:uuid:" + str(uuid.uuid4()), 42])
def test_top_up_with_a_jwt_sub_that_is_not_a_uuid_is_401_naming_it(client, service, db, sub):
    """Was 500: auth.uid() cast sub to uuid (22P02) inside begin_checkout."""
    import jwt

    from tests.conftest import SECRETS

    org = open_wallet(service)
    claims = jwt.decode(supabase_token(org), options={"verify_signature": False})
    token = jwt.encode(claims | {"sub": sub}, SECRETS["supabase_jwt_secret"], algorithm="HS256")
    answer = top_up(client, token, {"amount_minor": 2500, "client_request_id": str(uuid.uuid4())})
    assert answer.status_code == 401
    assert "sub" in answer.json["message"].lower()
    assert nothing_requested(db)


@pytest.mark.parametrize("org_id", ["acme", "00000000-0000-0000-0000-00000000000g", "123"])
def test_top_up_with_an_org_id_that_is_not_a_uuid_is_401_naming_it(client, db, org_id):
    """Was 500: billing._caller_org_id() cast app_metadata.org_id to uuid (22P02)."""
    answer = top_up(
        client, supabase_token(org_id), {"amount_minor": 2500, "client_request_id": str(uuid.uuid4())}
    )
    assert answer.status_code == 401
    assert "app_metadata.org_id" in answer.json["message"]
    assert nothing_requested(db)


def test_top_up_for_an_org_without_a_wallet_is_409(client, db):
    """Was 500: begin_checkout raised P0002. 409: the request is sound, the org's state is not."""
    answer = top_up(
        client, supabase_token(uuid.uuid4()), {"amount_minor": 2500, "client_request_id": str(uuid.uuid4())}
    )
    assert answer.status_code == 409
    assert answer.json["error"] == "not_found"
    assert "no wallet" in answer.json["message"]
    assert nothing_requested(db)


def test_top_up_body_nested_too_deep_is_400(client, service, db):
    """Was 500: Flask's get_json(silent=True) lets RecursionError through."""
    org = open_wallet(service)
    body = b'{"amount_minor": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = client.post(
        "/top-ups", data=body, content_type="application/json", headers=bearer(supabase_token(org))
    )
    assert answer.status_code == 400 and answer.json["error"] == "bad_request"
    assert nothing_requested(db)
