"""HTTP rows of `make bench`: signed Stripe webhooks and Vapi assistant-requests (call admission)
end to end through gunicorn against a bare Flask endpoint, and reconciling 10,000 Stripe objects
against merely paging through them.

Both pairs run on loopback only and are bounded in count and time: a load generator of
`HTTP_CLIENTS` clients sends pre-signed events for `ctx.seconds`, at most
`MAX_REQUESTS`; the reconciliation rows read a fixed 10,000 events from the fake Stripe."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

from bench.harness import BenchError, Context, Measurement, Row, org_uuid
from shim.fakes import payloads
from shim.fakes.serve import free_port

WEBHOOK_SECRET = "whsec_bench"
VAPI_SECRET = "vapi-bench-secret"
HTTP_CLIENTS = 8
MAX_REQUESTS = 100_000
# Events prepared per second of a row: above what either row reaches here (the bare endpoint
# peaked at 6,148/s), so that neither runs out of events and both are measured over the whole
# row. With 1,500/s the bare row used to run dry within 2 s and was timed on that burst alone.
EVENTS_PER_SECOND = 8_000
RECONCILE_OBJECTS = 10_000


Request = tuple[str, bytes, dict]  # path, body, headers


def signed_events(ctx: Context, count: int) -> list[Request]:
    """Real-shaped checkout.session.completed events for the seeded orgs, signed now (valid
    for Stripe's 300 s tolerance, longer than any row runs)."""
    now = int(time.time())
    out = []
    for i in range(count):
        org = org_uuid(1 + i % ctx.orgs)
        session = payloads.stripe_checkout_session(
            session_id=payloads.checkout_session_id(),
            org_id=org,
            amount_total=1000,
            payment_intent=payloads.stripe_id("pi_"),
        )
        body = json.dumps(
            payloads.stripe_event(
                event_id=payloads.stripe_id("evt_"),
                event_type="checkout.session.completed",
                data_object=session,
            )
        ).encode()
        signature = {"Stripe-Signature": payloads.sign_stripe(body, WEBHOOK_SECRET, now)}
        out.append(("/webhooks/stripe", body, signature))
    return out


def inbound_numbers(ctx: Context) -> None:
    """Every seeded org answers inbound calls on a number of its own (once per run)."""
    if "inbound_numbers" in ctx.extra:
        return
    import psycopg

    with psycopg.connect(ctx.ledger_url, autocommit=True) as conn:
        for i in range(1, ctx.orgs + 1):
            conn.execute(
                "SELECT api.set_inbound_assistant(%s, %s, 'asst-bench')", (org_uuid(i), f"pn-bench-{i}")
            )
    ctx.extra["inbound_numbers"] = True


def assistant_requests(ctx: Context, count: int) -> list[Request]:
    """Vapi assistant-requests for inbound calls to the seeded orgs' numbers, each a new call:
    one message built (and checked against the SDK's types), its ids varied per request."""
    template = payloads.vapi_assistant_request(
        payloads.vapi_call(status="ringing", call_type="inboundPhoneCall", phone_number_id="pn-bench-0")
    )
    out = []
    for i in range(count):
        message = template["message"]
        number = f"pn-bench-{1 + i % ctx.orgs}"
        call = {**message["call"], "id": str(uuid.uuid4()), "phoneNumberId": number}
        body = {"message": {**message, "call": call, "phoneNumber": {**message["phoneNumber"], "id": number}}}
        out.append(("/webhooks/vapi", json.dumps(body).encode(), {"X-Vapi-Secret": VAPI_SECRET}))
    return out


def serve(app_spec: str, env: dict, log_path) -> tuple[subprocess.Popen, int]:
    """gunicorn on 127.0.0.1 with the shim's production settings (shim.cli.gunicorn_argv)."""
    from shim.cli import gunicorn_argv

    port = free_port()
    argv = gunicorn_argv(port, workers=2, threads=8, host="127.0.0.1", app=app_spec, access_log="/dev/null")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.terminate()
    raise BenchError(f"gunicorn ({app_spec}) did not start; see {log_path}")


def post(port: int, path: str, body: bytes, headers: dict) -> int:
    """One delivery on a connection of its own, as providers' webhooks arrive. (With a few
    keep-alive connections, gunicorn's two workers split them by chance: all eight could land on
    one worker, one Python process, and a row measured half what another round did.)"""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def load(port: int, events: list[Request], seconds: float) -> Measurement:
    """HTTP_CLIENTS clients posting the events, each on its own connection, until time is up."""
    latencies: list[int] = []
    failed = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    cursor = iter(range(min(len(events), MAX_REQUESTS)))

    def client():
        mine, bad = [], 0
        while time.monotonic() < deadline:
            with lock:
                i = next(cursor, None)
            if i is None:
                break
            started = time.perf_counter_ns()
            status = post(port, *events[i])
            mine.append((time.perf_counter_ns() - started) // 1000)
            bad += status != 200
        with lock:
            latencies.extend(mine)
            failed[0] += bad

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(HTTP_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return Measurement(
        tps=len(latencies) / elapsed,
        latencies_us=latencies,
        transactions=len(latencies),
        failed=failed[0],
        clients=HTTP_CLIENTS,
    )


def http_row(app_spec: str, ctx: Context, label: str, events: list[Request]) -> Measurement:
    env = dict(
        os.environ,
        DATABASE_URL=ctx.ledger_url,
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        VAPI_WEBHOOK_SECRET=VAPI_SECRET,
        PYTHONPATH=os.getcwd(),
    )
    process, port = serve(app_spec, env, ctx.log_dir / f"{label}-gunicorn.log")
    try:
        return load(port, events, ctx.seconds)
    finally:
        process.terminate()
        process.wait(20)


def row_size(ctx: Context) -> int:
    return min(MAX_REQUESTS, EVENTS_PER_SECOND * ctx.seconds)


def bare_flask(ctx: Context) -> Measurement:
    return http_row("bench.bare_app:app", ctx, "bare-flask", signed_events(ctx, row_size(ctx)))


def shim_webhooks(ctx: Context) -> Measurement:
    result = http_row("shim.app:create_app()", ctx, "shim-webhooks", signed_events(ctx, row_size(ctx)))
    if result.failed:
        raise BenchError(f"{result.failed} signed webhooks were not answered 200")
    return result


def shim_admissions(ctx: Context) -> Measurement:
    """Each request admits a new call in one SQL call (a hold, or a stored refusal once the
    org's wallet is fully held) and answers Vapi's assistant-request."""
    inbound_numbers(ctx)
    # Admission answers within Vapi's 7.5 s; the row runs on fewer requests than webhooks get.
    result = http_row(
        "shim.app:create_app()", ctx, "shim-admissions", assistant_requests(ctx, row_size(ctx) // 4)
    )
    if result.failed:
        raise BenchError(f"{result.failed} assistant-requests were not answered 200")
    return result


# ---------------------------------------------------------------------------- reconciliation


def fake_stripe_with_events(ctx: Context):
    """The fake Stripe on loopback holding RECONCILE_OBJECTS paid checkout events (once per run)."""
    if "fake_stripe" not in ctx.extra:
        from shim.fakes import stripe_api
        from shim.fakes.serve import serve_in_thread

        app = stripe_api.create_app()
        control = app.test_client()
        for i in range(RECONCILE_OBJECTS):
            session = payloads.stripe_checkout_session(
                session_id=payloads.checkout_session_id(),
                org_id=org_uuid(1 + i % ctx.orgs),
                amount_total=500,
                payment_intent=payloads.stripe_id("pi_"),
            )
            control.post(
                "/_control/insert_event",
                json={"type": "checkout.session.completed", "data": {"object": session}},
            )
        ctx.extra["fake_stripe"] = serve_in_thread(app)
    return ctx.extra["fake_stripe"][0]


def stripe_client(url: str):
    import stripe

    return stripe.StripeClient("sk_test_bench", base_addresses={"api": url}, max_network_retries=0)


def page_stripe(ctx: Context) -> Measurement:
    """Only page GET /v1/events through the official client: the floor for reconciliation."""
    from datetime import UTC, datetime

    from shim.reconcile import stripe_events

    client = stripe_client(fake_stripe_with_events(ctx))
    now = datetime.now(UTC)
    started = time.monotonic()
    seen = sum(1 for _ in stripe_events(client, now - timedelta(days=1), now + timedelta(minutes=1)))
    elapsed = time.monotonic() - started
    return Measurement(tps=seen / elapsed, transactions=seen, clients=1)


def reconcile_stripe_objects(ctx: Context) -> Measurement:
    """Page the same events and feed each through api.reconcile_stripe_event (the first round
    credits them all; later rounds find them applied: both are what reconciliation costs)."""
    from datetime import UTC, datetime

    from shim.pool import open_pool
    from shim.reconcile import reconcile_stripe

    client = stripe_client(fake_stripe_with_events(ctx))
    with open_pool(ctx.ledger_url, max_size=2) as pool:
        started = time.monotonic()
        run = reconcile_stripe(pool, client, timedelta(days=1), now=datetime.now(UTC) + timedelta(minutes=1))
        elapsed = time.monotonic() - started
    if run["status"] != "completed" or run["seen"] < RECONCILE_OBJECTS:
        raise BenchError(f"reconciliation did not complete: {run}")
    return Measurement(tps=run["seen"] / elapsed, transactions=run["seen"], clients=1)


BARE_FLASK = "Flask bare endpoint, gunicorn (8 clients, a connection per request)"
PAGE = "page 10,000 Stripe events (fake API, official client)"

ROWS: list[Row] = [
    Row(BARE_FLASK, bare_flask, key="http-bare"),
    Row(
        "signed Stripe webhooks end to end, gunicorn + shim + ingest_webhook",
        shim_webhooks,
        baseline=BARE_FLASK,
        target=0.5,
        unit="events/s",
        key="http-webhooks",
    ),
    Row(
        "signed Vapi assistant-requests end to end (call admission), gunicorn + shim",
        shim_admissions,
        baseline=BARE_FLASK,
        target=0.5,
        unit="calls/s",
        key="http-admissions",
    ),
    Row(PAGE, page_stripe, unit="objects/s", key="stripe-page"),
    Row(
        "reconcile 10,000 Stripe events (same pages, through the webhook path)",
        reconcile_stripe_objects,
        baseline=PAGE,
        target=0.5,
        unit="objects/s",
        note="target 0.5x: reconciling costs at most 2x merely paging",
        key="stripe-reconcile",
    ),
]

if __name__ == "__main__":
    sys.exit("run `make bench`")
