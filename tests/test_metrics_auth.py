"""/metrics answers only the holder of METRICS_TOKEN, is off (503) without one, and a burst of
scrapes costs the database one health evaluation, not one each."""

import concurrent.futures
import dataclasses
import threading

import pytest

from shim import health
from shim.recent import Recent
from tests.conftest import SECRETS
from tests.senders import METRICS_AUTH

BILLING_SERIES = "creditledger_database_up 1.0"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Bearer {SECRETS['metrics_token']}x",
        f"Basic {SECRETS['metrics_token']}",
        f"{SECRETS['metrics_token']}",
        "Bearer m\u00e9trics",  # not ASCII: compare_digest on str would raise TypeError (500)
    ],
)
def test_metrics_without_the_token_is_401_and_reveals_nothing(client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 401
    assert answer.json["error"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"creditledger_" not in answer.get_data()


def test_metrics_with_the_token_answers(client):
    answer = client.get("/metrics", headers=METRICS_AUTH)
    assert answer.status_code == 200
    assert BILLING_SERIES in answer.get_data(as_text=True)


def test_the_bearer_scheme_is_case_insensitive(client):
    """RFC 7235 2.1: the auth-scheme is case-insensitive (Prometheus sends `Bearer`)."""
    answer = client.get("/metrics", headers={"Authorization": f"bearer {SECRETS['metrics_token']}"})
    assert answer.status_code == 200


def test_metrics_without_a_configured_token_is_503_for_everyone(shim_config, shim_app):
    """Unset METRICS_TOKEN: /metrics is off, like a provider endpoint without its secret."""
    from shim.app import create_app

    pool = shim_app.extensions["creditledger.pool"]
    app = create_app(dataclasses.replace(shim_config, metrics_token=None), pool=pool)
    for headers in ({}, METRICS_AUTH, {"Authorization": "Bearer "}):
        answer = app.test_client().get("/metrics", headers=headers)
        assert answer.status_code == 503
        assert answer.json["error"] == "not_configured"
        assert "METRICS_TOKEN" in answer.json["message"]
    # The other endpoints keep working.
    assert app.test_client().get("/healthz").status_code == 200


def test_refused_scrapes_never_query_the_database(client, monkeypatch):
    evaluations = []
    real_read = health.read
    monkeypatch.setattr(health, "read", lambda pool: evaluations.append(1) or real_read(pool))
    for _ in range(20):
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert evaluations == []


def test_a_burst_of_scrapes_evaluates_health_once(shim_config, shim_app, monkeypatch):
    """Forty concurrent scrapes within SCRAPE_CACHE_SECONDS: one api.health_report() call."""
    from shim.app import create_app

    evaluations = []
    real_read = health.read
    monkeypatch.setattr(health, "read", lambda pool: evaluations.append(1) or real_read(pool))
    app = create_app(shim_config, pool=shim_app.extensions["creditledger.pool"])

    def scrape(_):
        return app.test_client().get("/metrics", headers=METRICS_AUTH)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(scrape, range(40)))
    assert {a.status_code for a in answers} == {200}
    assert all(BILLING_SERIES in a.get_data(as_text=True) for a in answers)
    assert len(evaluations) == 1


# ---------------------------------------------------------------------- shim.recent.Recent


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_recent_reuses_a_value_until_it_is_max_age_old():
    clock, calls = Clock(), []
    recent = Recent(lambda: calls.append(1) or len(calls), max_age=5, clock=clock)
    assert recent() == 1
    clock.now += 4.9
    assert recent() == 1
    clock.now += 0.1
    assert recent() == 2


def test_recent_remembers_a_failure_for_max_age_too():
    """A database that is down is not asked again by every scrape while it is down."""
    clock, calls = Clock(), []

    def fails():
        calls.append(1)
        raise ConnectionError("down")

    recent = Recent(fails, max_age=5, clock=clock)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            recent()
    assert len(calls) == 1
    clock.now += 5
    with pytest.raises(ConnectionError):
        recent()
    assert len(calls) == 2


def test_recent_computes_once_for_concurrent_callers():
    started, release, calls = threading.Event(), threading.Event(), []

    def slow():
        calls.append(1)
        started.set()
        release.wait(5)
        return "value"

    recent = Recent(slow, max_age=60)
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(recent) for _ in range(6)]
        started.wait(5)
        release.set()
        assert [f.result(timeout=5) for f in futures] == ["value"] * 6
    assert len(calls) == 1
