"""50 inbound calls of one org at once, over real HTTP through gunicorn: the fake Vapi sends
every assistant-request concurrently, runs each admitted call to its maxDurationSeconds (or
less), and reports it. Whatever the mix, what was admitted never exceeds what the wallet could
pay, and no report takes the wallet below -debt_limit by more than one billing increment per
call that was in flight."""

import concurrent.futures
import random

import pytest
import requests

from shim.fakes import payloads
from tests.conftest import SECRETS, VAPI_API_KEY
from tests.db_helpers import open_wallet, wallet
from tests.gunicorn_server import running_gunicorn

CALLS = 50
RATE = 70  # per minute


@pytest.fixture
def vapi_gunicorn(db_url, tmp_path, fake_vapi):
    """gunicorn with Vapi's API at the fake; the fake's calls report to it."""
    env = {"VAPI_API_KEY": VAPI_API_KEY, "VAPI_API_BASE": fake_vapi.url, "VAPI_CONTROL_HOSTS": "127.0.0.1"}
    with running_gunicorn(db_url, tmp_path, env, workers=2, threads=8) as url:
        fake_vapi.control("server", {"url": f"{url}/webhooks/vapi", "secret": SECRETS["vapi_webhook_secret"]})
        yield url


def place_inbound_calls(fake_vapi, number: str, talk_seconds: list[float]) -> list[dict]:
    def one(talk):
        answer = requests.post(
            f"{fake_vapi.url}/_control/inbound",
            json={"phone_number_id": number, "talk_seconds": talk},
            timeout=60,
        )
        answer.raise_for_status()
        return answer.json()

    with concurrent.futures.ThreadPoolExecutor(max_workers=CALLS) as pool:
        return list(pool.map(one, talk_seconds))


def redeliver_reports(url: str, fake_vapi) -> set[int]:
    """Vapi retries: every report sent again, as new bytes (another timestamp)."""
    statuses = set()
    listed = requests.get(
        f"{fake_vapi.url}/call",
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {VAPI_API_KEY}"},
        timeout=30,
    )
    for call in listed.json():
        if call.get("status") != "ended":
            continue
        message = payloads.vapi_end_of_call_report(call)
        message["message"]["timestamp"] += 1
        answer = requests.post(
            f"{url}/webhooks/vapi",
            json=message,
            headers={"X-Vapi-Secret": SECRETS["vapi_webhook_secret"]},
            timeout=30,
        )
        statuses.add(answer.status_code)
        assert answer.json()["status"] == "duplicate"
    return statuses


@pytest.mark.slow
@pytest.mark.parametrize(
    ("debt_limit", "max_call_minutes", "suspended", "hold_open", "seed"),
    [(0, 2, False, True, 1), (300, 3, False, True, 2), (0, 2, False, False, 3), (500, 2, True, True, 4)],
    ids=["capped-2min", "debt-limit", "ending-early", "suspended"],
)
def test_concurrent_inbound_calls_never_pass_the_debt_limit(
    vapi_gunicorn, fake_vapi, service, db, debt_limit, max_call_minutes, suspended, hold_open, seed
):
    balance = 10 * RATE  # worth 10 minutes
    org = open_wallet(service, balance_minor=balance, debt_limit_minor=debt_limit)
    service.execute("SELECT api.set_max_call_minutes(%s, %s)", (org, max_call_minutes))
    if suspended:
        db.execute("UPDATE billing.wallets SET status = 'suspended' WHERE org_id = %s", (org,))
    number = f"pn-{org}"
    service.execute("SELECT api.set_inbound_assistant(%s, %s, 'asst-front-desk')", (org, number))
    rng = random.Random(seed)
    # Some hang up early, most would talk past what they were admitted for.
    talks = [rng.choice([20.0, 45.5, 90.0, 400.0, 3000.0]) for _ in range(CALLS)]

    calls = place_inbound_calls(fake_vapi, number, [None if hold_open else t for t in talks])

    admitted = [c for c in calls if not c["refused"]]
    assert all(c["status"] == 200 for c in calls)
    assert all(c["answer"]["assistantOverrides"]["maxDurationSeconds"] >= 60 for c in admitted)
    if suspended:
        assert admitted == []
    else:
        assert admitted, "a wallet worth 10 minutes admits at least one call"
    if hold_open:
        # Every admitted call is still talking: together they hold at most what the wallet affords.
        seconds = [c["answer"]["assistantOverrides"]["maxDurationSeconds"] for c in admitted]
        held = wallet(db, org)["held_minor"]
        assert held == sum(-(-s * RATE // 60) for s in seconds)  # each call priced on its own
        assert held <= balance + debt_limit
        hang_up_all(fake_vapi, [c["call_id"] for c in admitted], talks)

    # Every report is in: nothing is held, and one increment (1 s at 70/min) per call is the slack.
    after = wallet(db, org)
    assert after["held_minor"] == 0
    slack = len(admitted) * -(-RATE // 60)
    assert after["balance_minor"] >= -debt_limit - slack
    charged = db.execute(
        "SELECT count(*) AS n FROM billing.ledger_entries WHERE org_id = %s AND kind = 'call_charge'", (org,)
    ).fetchone()["n"]
    assert charged == CALLS  # every call reported once, the refused ones at 0

    assert redeliver_reports(vapi_gunicorn, fake_vapi) <= {200}
    assert wallet(db, org)["balance_minor"] == after["balance_minor"]


def hang_up_all(fake_vapi, call_ids: list[str], talks: list[float]) -> None:
    """The admitted calls end at once, each after its talk time (cut at its cap by Vapi)."""

    def one(pair):
        call_id, seconds = pair
        requests.post(
            f"{fake_vapi.url}/_control/hang_up/{call_id}", json={"seconds": seconds}, timeout=60
        ).raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(call_ids) or 1) as pool:
        list(pool.map(one, zip(call_ids, talks, strict=False)))
