"""Test databases: one server per session, a migrated template, a fresh clone for every test.

The server is TEST_DATABASE_URL when set (CI runs the suite against Debian's PostgreSQL 15 this
way), else an embedded PostgreSQL from pgserver in a temporary folder. Each test gets its own
database cloned from the template by pytest-postgresql's janitor (procrastinate's conftest does
the same), and after each test the ledger invariants must hold.
"""

import os
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from pytest_postgresql.janitor import DatabaseJanitor

from shim.migrate import migrate


@pytest.fixture(scope="session")
def server_url():
    """The URL of a server the tests may create databases on."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="creditledger-test-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def database_url(server_url: str, dbname: str) -> str:
    """The server's URL pointing at another database (a URL: yoyo and pgbench take URLs)."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{dbname}"))


def janitor(server_url: str, dbname: str, **kwargs) -> DatabaseJanitor:
    """pytest-postgresql's janitor for one database on the test server."""
    params = conninfo_to_dict(server_url)
    return DatabaseJanitor(
        user=params.get("user") or "postgres",
        password=params.get("password"),
        host=params.get("host") or "localhost",
        port=params.get("port") or 5432,
        dbname=dbname,
        **kwargs,
    )


@pytest.fixture(scope="session")
def template_name(server_url):
    """A migrated template database, built once per session (unique name: runs may overlap)."""
    name = f"creditledger_tpl_{os.getpid()}"
    template = janitor(server_url, name, as_template=True)
    template.init()
    try:
        migrate(database_url(server_url, name))
        yield name
    finally:
        template.drop()


@pytest.fixture
def db_url(request, server_url, template_name):
    """A fresh migrated database for this test; its ledger invariants are checked afterwards."""
    name = f"creditledger_test_{uuid.uuid4().hex[:16]}"
    with janitor(server_url, name, template_dbname=template_name):
        url = database_url(server_url, name)
        yield url
        if "corrupts_ledger" not in request.keywords:
            with psycopg.connect(url) as conn:
                violations = conn.execute("SELECT * FROM api.ledger_invariant_violations()").fetchall()
            assert violations == [], f"ledger invariants broken after the test: {violations}"


@pytest.fixture
def db(db_url):
    """A superuser connection (autocommit, rows as dicts) for setup and inspection."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def service(db_url):
    """A connection acting as Supabase's service_role: what the shim and the backend use."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET ROLE service_role")
        yield conn


# ---------------------------------------------------------------------------- the shim

VAPI_API_KEY = "vapi-test-api-key"
SECRETS = {
    "stripe_webhook_secret": "whsec_test_secret",
    "vapi_webhook_secret": "vapi-test-secret",
    "twilio_auth_token": "twilio-test-token",
    "public_base_url": "https://billing.example.test",
    "supabase_jwt_secret": "supabase-test-jwt-secret-at-least-32-bytes",
    "stripe_api_key": "sk_test_creditledger",
    "metrics_token": "metrics-test-token",
}


@pytest.fixture
def pool(db_url):
    """A connection pool on this test's database, as the worker and the shim use one."""
    from shim.pool import open_pool

    with open_pool(db_url, max_size=6) as pool:
        yield pool


@pytest.fixture
def shim_config(db_url, fake_stripe, fake_vapi):
    """The shim's configuration against this test's database, every provider configured,
    Stripe's and Vapi's APIs pointed at the fakes, and the fake Vapi's loopback control URLs
    trusted."""
    from shim.config import Config

    return Config(
        database_url=db_url,
        stripe_api_base=fake_stripe.url,
        vapi_api_key=VAPI_API_KEY,
        vapi_api_base=fake_vapi.url,
        vapi_control_hosts=("127.0.0.1",),
        **SECRETS,
    )


@pytest.fixture
def shim_app(shim_config):
    """The Flask app with a real pool on this test's database."""
    from shim.app import create_app
    from shim.pool import open_pool

    pool = open_pool(shim_config.database_url, max_size=20)
    pool.open(wait=True)
    try:
        yield create_app(shim_config, pool=pool)
    finally:
        pool.close()


@pytest.fixture
def client(shim_app):
    """Flask's test client: the real request stack, in-process."""
    return shim_app.test_client()


# ---------------------------------------------------------------------------- fake providers


class FakeProvider:
    """A fake provider API served on loopback, with its /_control endpoints at hand."""

    def __init__(self, url: str):
        self.url = url

    def control(self, path: str, body=None) -> dict:
        import requests

        answer = requests.post(f"{self.url}/_control/{path}", json=body or {}, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def stats(self) -> dict:
        import requests

        return requests.get(f"{self.url}/_control/stats", timeout=10).json()


@pytest.fixture
def shim_url(shim_app):
    """The shim served on 127.0.0.1 (threaded werkzeug), for providers that call it back."""
    from shim.fakes.serve import serve_in_thread

    url, stop = serve_in_thread(shim_app)
    yield url
    stop()


@pytest.fixture
def fake_stripe():
    """The stateful fake Stripe API on loopback (no webhook delivery until stripe_delivers)."""
    from shim.fakes import stripe_api
    from shim.fakes.serve import serve_in_thread

    url, stop = serve_in_thread(stripe_api.create_app())
    yield FakeProvider(url)
    stop()


@pytest.fixture
def stripe_delivers(fake_stripe, shim_url):
    """Make the fake Stripe deliver its events, signed, to the running shim."""
    fake_stripe.control(
        "webhooks",
        {"url": f"{shim_url}/webhooks/stripe", "secret": SECRETS["stripe_webhook_secret"], "deliver": True},
    )
    return fake_stripe


@pytest.fixture
def fake_vapi():
    """The fake Vapi API (GET /call) on loopback."""
    from shim.fakes import vapi_api
    from shim.fakes.serve import serve_in_thread

    url, stop = serve_in_thread(vapi_api.create_app(VAPI_API_KEY))
    yield FakeProvider(url)
    stop()


TWILIO_ACCOUNT_SID = "AC" + "7" * 32


@pytest.fixture
def fake_twilio():
    """The fake Twilio Message API on loopback, for the account TWILIO_ACCOUNT_SID (its password
    is the auth token the status callbacks are signed with, as at Twilio)."""
    from shim.fakes import twilio_api
    from shim.fakes.serve import serve_in_thread

    url, stop = serve_in_thread(twilio_api.create_app(TWILIO_ACCOUNT_SID, SECRETS["twilio_auth_token"]))
    yield FakeProvider(url)
    stop()
