"""The shim and the money functions through pgbouncer in transaction mode, which is how Supabase
clients reach the database on port 6543: every transaction may land on another server
connection, so nothing may depend on session state (prepared statements, session GUCs, session
advisory locks). Skipped when pgbouncer is not installed, unless REQUIRE_PGBOUNCER=1.
"""

import concurrent.futures
import dataclasses
import json
import threading
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from shim.app import create_app
from shim.fakes import payloads
from shim.pool import open_pool
from shim.worker import run_once
from tests.db_helpers import as_user, open_wallet, wallet
from tests.jwt_tokens import bearer, supabase_token
from tests.pgbouncer import PgBouncer, require_pgbouncer
from tests.senders import paid_checkout, post_stripe, stripe_event

RATE = 70  # the default per-minute rate the wallets below are priced at


@pytest.fixture
def start_pgbouncer(server_url):
    """Start pgbouncer(s) in front of the test server; all stopped (before the test database is
    dropped) when the test ends."""
    binary = require_pgbouncer()
    started = []

    def start(**options) -> PgBouncer:
        bouncer = PgBouncer(server_url, binary=binary, **options).start()
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


@pytest.fixture
def pooler(start_pgbouncer):
    """pgbouncer with 4 server connections per database and user, transaction pooling."""
    return start_pgbouncer(default_pool_size=4)


@pytest.fixture
def pooler_url(pooler, db_url):
    """This test's database, through pgbouncer."""
    return pooler.url_for(db_url)


def connect(url, **kwargs) -> psycopg.Connection:
    """A client connection the way the shim makes them: autocommit, prepared statements off."""
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(url, autocommit=True, row_factory=dict_row, **kwargs)


def call_cost(seconds: int) -> int:
    """ceil(seconds x rate / 60) at a 1 s billing increment (DESIGN.md)."""
    return -(-seconds * RATE // 60)


def server_backends(db, *direct: psycopg.Connection) -> list[dict]:
    """The server's client backends on this test's database, other than our direct connections
    (db and the given ones): the pooler's server connections."""
    mine = [db.info.backend_pid] + [conn.info.backend_pid for conn in direct]
    return db.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> ALL(%s)",
        (mine,),
    ).fetchall()


# ---------------------------------------------------------------------------- the pooler itself


def test_pgbouncer_runs_in_transaction_mode_on_loopback(pooler, pooler_url, db):
    assert pooler.pool_mode == "transaction" and pooler.port
    assert pooler_url.startswith(f"postgresql://{pooler.login_user}@127.0.0.1:{pooler.port}/")
    with connect(pooler_url) as conn:
        row = conn.execute("SELECT current_database() AS db, current_user AS who").fetchone()
    assert row == {"db": db.info.dbname, "who": pooler.login_user}
    assert "pool_mode = transaction" in pooler.ini_text(pooler.port)


# ---------------------------------------------------------------------------- (a) money functions


def test_money_functions_through_the_pooler_with_four_times_more_clients_than_servers(
    pooler, pooler_url, service, db
):
    """16 client connections, all open at once, share pgbouncer's 4 server connections; each
    client authorises, charges and credits calls on 4 orgs. Every call applies exactly once,
    a replay through the pooler is a duplicate, and the balances are exact."""
    clients, rounds, seed = 16, 8, 1_000_000
    orgs = [open_wallet(service, balance_minor=seed) for _ in range(4)]
    ready = threading.Barrier(clients)
    lock = threading.Lock()
    pids: set[int] = set()
    statuses: list[str] = []
    plan: dict = {org: {"costs": 0, "credits": 0, "calls": []} for org in orgs}

    def client(n: int):
        org = orgs[n % len(orgs)]
        mine = {"costs": 0, "credits": 0, "calls": []}
        seen = set()
        with connect(pooler_url) as conn:
            ready.wait(timeout=60)  # 16 client connections exist at the same time
            for i in range(rounds):
                call_id, seconds, credit = f"call-{n}-{i}-{uuid.uuid4()}", 17 + 13 * n + 7 * i, 100 + n + i
                seen.add(conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"])
                held = conn.execute("SELECT * FROM api.authorize_call(%s, %s, 10)", (org, call_id)).fetchone()
                charged = conn.execute(
                    "SELECT * FROM api.deduct_call_credits(%s, %s, %s)", (org, call_id, seconds)
                ).fetchone()
                credited = conn.execute(
                    "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)",
                    (org, credit, f"credit-{call_id}"),
                ).fetchone()
                assert charged["amount_minor"] == -call_cost(seconds)
                mine["costs"] += call_cost(seconds)
                mine["credits"] += credit
                mine["calls"].append((call_id, seconds))
                with lock:
                    statuses.extend([held["status"], charged["status"], credited["status"]])
        with lock:
            pids.update(seen)
            plan[org]["costs"] += mine["costs"]
            plan[org]["credits"] += mine["credits"]
            plan[org]["calls"] += mine["calls"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as executor:
        for future in [executor.submit(client, n) for n in range(clients)]:
            future.result()

    assert statuses == ["applied"] * (clients * rounds * 3)
    # Transaction pooling really multiplexed: 16 clients, at most 4 server backends.
    assert 1 <= len(pids) <= pooler.default_pool_size < clients
    assert 1 <= len(server_backends(db, service)) <= pooler.default_pool_size
    for org in orgs:
        w = wallet(db, org)
        assert w["balance_minor"] == seed + plan[org]["credits"] - plan[org]["costs"]
        assert w["held_minor"] == 0
    assert (
        db.execute("SELECT count(*) AS n FROM billing.holds WHERE status <> 'captured'").fetchone()["n"] == 0
    )

    # A retry through the pooler (on whichever server connection) is answered from the ledger.
    org = orgs[0]
    call_id, seconds = plan[org]["calls"][0]
    with connect(pooler_url) as conn:
        again = conn.execute(
            "SELECT * FROM api.deduct_call_credits(%s, %s, %s)", (org, call_id, seconds)
        ).fetchone()
        other = conn.execute(
            "SELECT * FROM api.deduct_call_credits(%s, %s, %s)", (org, call_id, seconds + 1)
        ).fetchone()
    assert again["status"] == "duplicate" and again["amount_minor"] == -call_cost(seconds)
    assert other["status"] == "conflict" and other["reason"] == "different_request"


def test_prepared_statements_break_in_transaction_mode_which_is_why_prepare_threshold_is_none(
    start_pgbouncer, db_url, service
):
    """pgbouncer hands each transaction the most recently used idle server connection (LIFO). A
    client that prepared a statement on server connection X, while another client holds X in a
    transaction, runs its next statement on Y, where that statement does not exist. The shim's
    connections (shim.pool, shim.database) never prepare (prepare_threshold=None)."""
    bouncer = start_pgbouncer(default_pool_size=2)
    url = bouncer.url_for(db_url)
    org = open_wallet(service, balance_minor=10_000)
    query = "SELECT balance_minor FROM billing.wallets WHERE org_id = %s"

    def interleave(prepared: psycopg.Connection):
        """Open both server connections, prepare on one, pin it to another client, run again."""
        with connect(url) as first, connect(url) as second:
            with first.transaction(), second.transaction():  # two server connections exist
                first.execute("SELECT 1")
                second.execute("SELECT 1")
            prepared.execute(query, (org,))  # prepares on the last-used server connection (LIFO)
            with first.transaction():
                first.execute("SELECT 1")  # LIFO: takes the connection the statement lives on
                return prepared.execute(query, (org,)).fetchone()  # runs on the other one

    with (
        connect(url, prepare_threshold=0) as always_prepares,
        pytest.raises(psycopg.errors.InvalidSqlStatementName),
    ):
        interleave(always_prepares)

    with connect(url) as never_prepares:  # what shim.database.connect and shim.pool use
        assert interleave(never_prepares) == {"balance_minor": 10_000}

    with open_pool(url, max_size=2) as pool, pool.connection() as conn:
        assert conn.prepare_threshold is None
        for _ in range(3):
            assert interleave(conn) == {"balance_minor": 10_000}


# ---------------------------------------------------------------------------- (b) the shim


@pytest.fixture
def pooled_app(shim_config, pooler_url):
    """The shim with its pool on the pooler (as deployed against Supabase's port 6543)."""
    config = dataclasses.replace(shim_config, database_url=pooler_url)
    pool = open_pool(pooler_url, max_size=12)
    pool.open(wait=True)
    try:
        yield create_app(config, pool=pool)
    finally:
        pool.close()


def test_shim_answers_signed_stripe_webhooks_through_the_pooler(pooled_app, service, db):
    org = open_wallet(service)
    client = pooled_app.test_client()
    session, pi = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    answer = post_stripe(client, event)
    assert answer.status_code == 200
    assert answer.json["status"] == "processed" and answer.json["result"]["status"] == "applied"
    again = post_stripe(client, event)
    assert again.status_code == 200 and again.json["status"] == "duplicate"
    # The same PaymentIntent through its own event: keyed on the PaymentIntent, credited once.
    intent = payloads.stripe_payment_intent(pi_id=pi, org_id=str(org), amount=2500)
    assert (
        post_stripe(client, stripe_event("payment_intent.succeeded", intent)).json["result"]["status"]
        == "duplicate"
    )

    # 12 concurrent deliveries of distinct payments, through 4 server connections.
    events = [stripe_event("checkout.session.completed", paid_checkout(org, 1000 + i)[0]) for i in range(12)]

    def deliver(ev):
        return post_stripe(pooled_app.test_client(), ev)

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as executor:
        answers = list(executor.map(deliver, events))
    assert [a.status_code for a in answers] == [200] * 12
    assert {a.json["result"]["status"] for a in answers} == {"applied"}
    assert wallet(db, org)["balance_minor"] == 2500 + sum(1000 + i for i in range(12))
    statuses = db.execute(
        "SELECT status, count(*) AS n FROM billing.webhook_events GROUP BY status"
    ).fetchall()
    assert statuses == [{"status": "processed", "n": 14}]


def test_top_up_acts_as_the_user_only_inside_its_transaction(
    start_pgbouncer, db_url, shim_config, service, db, fake_stripe
):
    """POST /top-ups becomes the user with set_config('role' / 'request.jwt.claims', ..., true):
    transaction-local, so nothing of it survives on the pooled server connection. With one
    server connection, every later client runs on the very backend the top-up used."""
    bouncer = start_pgbouncer(default_pool_size=1)
    url = bouncer.url_for(db_url)
    config = dataclasses.replace(shim_config, database_url=url)
    org_a, org_b = open_wallet(service), open_wallet(service)

    def session_state() -> dict:
        with connect(url) as conn:
            return conn.execute(
                "SELECT pg_backend_pid() AS pid, current_user AS current_user, session_user AS session_user, "
                "current_setting('role') AS role, "
                "nullif(current_setting('request.jwt.claims', true), '') AS claims, auth.jwt() AS jwt"
            ).fetchone()

    before = session_state()
    with open_pool(url, max_size=4) as pool:
        client = create_app(config, pool=pool).test_client()
        answer = client.post(
            "/top-ups",
            json={"amount_minor": 2500, "client_request_id": str(uuid.uuid4())},
            headers=bearer(supabase_token(org_a)),
        )
        assert answer.status_code == 200 and answer.json["status"] == "created"
        after = session_state()
        # The next user's request on the same server connection is that user's, not org A's.
        answer_b = client.post(
            "/top-ups",
            json={"amount_minor": 3000, "client_request_id": str(uuid.uuid4())},
            headers=bearer(supabase_token(org_b)),
        )
        assert answer_b.status_code == 200 and answer_b.json["session_id"] != answer.json["session_id"]

    assert after["pid"] == before["pid"]  # one server connection: the top-up ran on this backend
    assert after == before
    assert after["claims"] is None and after["jwt"] is None
    assert after["current_user"] == after["session_user"] == bouncer.login_user
    assert after["role"] == "none"
    requests = db.execute("SELECT org_id, amount_minor FROM billing.checkout_requests ORDER BY id").fetchall()
    assert requests == [{"org_id": org_a, "amount_minor": 2500}, {"org_id": org_b, "amount_minor": 3000}]

    # The control: a session-level set_config (is_local false) does leak to the next client of
    # the same server connection, which is why the shim and PostgREST only ever use SET LOCAL.
    leaked_claims = json.dumps({"role": "authenticated", "app_metadata": {"org_id": str(org_a)}})
    with connect(url) as conn:
        conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (leaked_claims,))
    with connect(url) as stranger:
        seen = stranger.execute("SELECT current_setting('request.jwt.claims', true) AS claims").fetchone()
        assert json.loads(seen["claims"])["app_metadata"]["org_id"] == str(org_a)
        stranger.execute("SELECT set_config('request.jwt.claims', '', false)")


# ---------------------------------------------------------------------------- (c) auto-recharge


def test_auto_recharge_claim_under_advisory_xact_lock_through_the_pooler(
    pooler, pooler_url, shim_config, service, db, fake_stripe
):
    """50 concurrent charges from 16 client connections cross the threshold once: one pending
    claim (pg_advisory_xact_lock + the partial unique index), no advisory lock left on any pooled
    server connection, and the worker, itself on the pooler, makes one PaymentIntent."""
    org = open_wallet(service, balance_minor=4_000)
    service.execute(
        "SELECT * FROM api.set_payment_method(%s, 'cus_PoolerTest01', 'pm_card_visa_pooler')", (org,)
    )
    with as_user(db, org, "owner", commit=True) as conn:
        conn.execute("SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2000::bigint)")

    local = threading.local()
    opened: list[psycopg.Connection] = []
    opened_lock = threading.Lock()

    def charge(_):
        if not hasattr(local, "conn"):
            local.conn = connect(pooler_url)
            with opened_lock:
                opened.append(local.conn)
        return local.conn.execute(
            "SELECT * FROM api.deduct_call_credits(%s, %s, 60)", (org, f"call-{uuid.uuid4()}")
        ).fetchone()["status"]

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
            statuses = list(executor.map(charge, range(50)))  # 50 x 70: 4000 -> 500, crossing 1000
    finally:
        for conn in opened:
            conn.close()
    assert statuses == ["applied"] * 50

    claims = db.execute("SELECT * FROM billing.recharge_claims WHERE org_id = %s", (org,)).fetchall()
    assert [c["status"] for c in claims] == ["pending"]
    assert claims[0]["amount_minor"] == 3_000 - 990  # taken at the first balance below 1000
    # This database's advisory locks only: pg_locks spans the server, where another session (a
    # migration elsewhere, another run on the same server) may hold one of its own.
    advisory = db.execute(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()["n"]
    assert advisory == 0

    config = dataclasses.replace(shim_config, database_url=pooler_url)
    with open_pool(pooler_url, max_size=4) as pool:
        run_once(pool, config)
        run_once(pool, config)
    intents = fake_stripe.stats()["endpoints"]["POST /v1/payment_intents"]
    assert intents["created"] == 1
    (claim,) = db.execute("SELECT * FROM billing.recharge_claims WHERE org_id = %s", (org,)).fetchall()
    assert claim["status"] == "succeeded"
    assert wallet(db, org)["balance_minor"] == 500 + claim["amount_minor"]
