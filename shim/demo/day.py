"""The scripted day: what three customer orgs do, sent over HTTP exactly as the providers and
the platform's frontend would send it."""

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
import psycopg
import requests
from psycopg.rows import dict_row

from shim.demo.stack import SECRETS, Stack
from shim.fakes import payloads


@dataclass
class Org:
    name: str
    org_id: uuid.UUID
    card: str

    @property
    def assistant_id(self) -> str:
        """The org's Vapi assistant: its calls are the org's to pay (the routing table)."""
        return f"asst-{self.org_id}"


class Day:
    """Each method is one scene; `steps` counts them for the progress bar."""

    def __init__(self, stack: Stack, progress):
        self.stack = stack
        self.progress = progress
        self.http = requests.Session()
        self.db = psycopg.connect(stack.db_url, autocommit=True, row_factory=dict_row)
        self.morning = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)
        self.orgs = [
            Org("Acme Dental", uuid.uuid4(), "pm_card_acme"),
            Org("Bolt Logistics", uuid.uuid4(), "pm_card_bolt_declines"),
            Org("Cedar Realty", uuid.uuid4(), "pm_card_cedar"),
        ]
        self.recovered = {}

    # ------------------------------------------------------------------ plumbing

    def sql(self, query: str, *args):
        return self.db.execute(query, args).fetchall()

    def control(self, base: str, path: str, body=None):
        answer = self.http.post(f"{base}/_control/{path}", json=body or {}, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def token(self, org: Org, role="owner") -> str:
        now = int(time.time())
        claims = {
            "aud": "authenticated",
            "role": "authenticated",
            "sub": str(uuid.uuid4()),
            "iat": now,
            "exp": now + 3600,
            "app_metadata": {"org_id": str(org.org_id), "org_role": role},
        }
        return jwt.encode(claims, SECRETS["SUPABASE_JWT_SECRET"], algorithm="HS256")

    def vapi(self, message: dict):
        answer = self.http.post(
            f"{self.stack.shim_url}/webhooks/vapi",
            json=message,
            timeout=30,
            headers={"X-Vapi-Secret": SECRETS["VAPI_WEBHOOK_SECRET"]},
        )
        answer.raise_for_status()
        return answer.json()

    def twilio(self, sid: str, status: str):
        params = payloads.twilio_status_callback(
            message_sid=sid,
            status=status,
            account_sid=SECRETS["TWILIO_ACCOUNT_SID"],
            from_="+15550100000",
            to="+15550199999",
        )
        url = f"{self.stack.shim_url}/webhooks/twilio/sms-status"
        signature = payloads.sign_twilio(url, params, SECRETS["TWILIO_AUTH_TOKEN"])
        self.http.post(
            url, data=params, headers={"X-Twilio-Signature": signature}, timeout=30
        ).raise_for_status()

    def wait_for(self, what: str, condition, seconds: float = 20):
        """The worker runs on its own schedule: wait (bounded) for what it should do."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for: {what}")

    # ------------------------------------------------------------------ scenes

    def open_accounts(self):
        for org in self.orgs:
            self.sql("SELECT api.open_wallet(%s, 'usd', 2000)", org.org_id)
            self.sql("SELECT api.set_payment_method(%s, %s, %s)", org.org_id, f"cus_{org.card[8:]}", org.card)
            self.sql("SELECT api.set_low_balance_threshold(%s, 1500)", org.org_id)
            self.sql("SELECT api.set_vapi_route('assistant', %s, %s)", org.assistant_id, org.org_id)
        self.sql("SELECT api.set_pricing(%s, 90, 6, 2)", self.orgs[2].org_id)  # Cedar: premium voice
        self.control(
            self.stack.stripe_url, "decline", {"payment_method": self.orgs[1].card, "code": "card_declined"}
        )
        self.progress("wallets opened, cards saved")

    def top_up(self, org: Org, amount: int, clicks: int = 1) -> str:
        """The customer clicks 'Add credit' (maybe twice) and pays on the Checkout page."""
        request_id = str(uuid.uuid4())
        sessions = set()
        for _ in range(clicks):
            answer = self.http.post(
                f"{self.stack.shim_url}/top-ups",
                timeout=30,
                json={"amount_minor": amount, "client_request_id": request_id},
                headers={"Authorization": f"Bearer {self.token(org)}"},
            )
            answer.raise_for_status()
            sessions.add(answer.json()["session_id"])
        assert len(sessions) == 1, "a double click must not open a second Checkout Session"
        paid = self.control(self.stack.stripe_url, f"complete_session/{sessions.pop()}")
        return paid["payment_intent"]["id"]

    def morning_top_ups(self):
        self.intents = {
            org.name: self.top_up(org, amount, clicks=2 if org is self.orgs[0] else 1)
            for org, amount in zip(self.orgs, (12_000, 5_000, 15_000), strict=True)
        }
        self.progress("morning top-ups (Acme double-clicked: one session)")

    def autorecharge_settings(self):
        for org, threshold, amount in ((self.orgs[0], 3_000, 10_000), (self.orgs[1], 2_500, 5_000)):
            # The owner switches it on from the app: the same call PostgREST makes, as that user.
            with self.db.transaction():
                self.db.execute(
                    "SELECT set_config('role', 'authenticated', true), "
                    "set_config('request.jwt.claims', %s, true)",
                    (json.dumps(jwt.decode(self.token(org), options={"verify_signature": False})),),
                )
                self.db.execute("SELECT api.configure_auto_recharge(true, %s, %s)", (threshold, amount))
        self.progress("auto-recharge on for Acme and Bolt")

    def call(self, org: Org, minute: int, seconds: float, *, report=True, duplicate=False, connected=True):
        """One phone call: in-progress status, then the end-of-call report."""
        start = self.morning + timedelta(minutes=minute)
        live = payloads.vapi_call(assistant_id=org.assistant_id, started_at=start, status="in-progress")
        self.vapi(payloads.vapi_status_update(live, "in-progress"))
        ended = payloads.vapi_call(
            assistant_id=org.assistant_id,
            call_id=live["id"],
            started_at=start if connected else None,
            ended_at=start + timedelta(seconds=seconds),
            updated_at=start + timedelta(seconds=seconds + 2),
            ended_reason="customer-ended-call" if connected else "customer-did-not-answer",
        )
        self.calls.append(ended)
        if report:
            message = payloads.vapi_end_of_call_report(ended)
            self.vapi(message)
            if duplicate:
                self.vapi(message)

    def calls_through_the_day(self):
        self.calls = []
        durations = [185.4, 62.0, 340.9, 12.5, 600.0, 95.3, 44.1, 121.7, 250.0, 30.2]
        for i in range(30):
            org = self.orgs[i % 3]
            self.call(
                org,
                60 + i * 12,
                durations[i % len(durations)],
                duplicate=(i % 7 == 0),
                connected=(i % 11 != 5),
            )
        self.progress("30 calls (some reported twice, one never connected)")

    def sms_traffic(self):
        for i, org in enumerate(self.orgs * 3):
            sid = payloads.twilio_sid("SM")
            self.sql("SELECT api.register_sms(%s, %s, %s)", org.org_id, sid, 1 + i % 3)
            statuses = [
                ["sent", "delivered"],
                ["delivered", "sent"],
                ["failed"],
                ["sent", "sent", "undelivered"],
            ][i % 4]
            for status in statuses:
                self.twilio(sid, status)
        self.progress("9 SMS: delivered, out of order, failed, duplicated")

    def webhook_outage(self):
        """Stripe deliveries stop, a fifth of Vapi reports and an SMS's status callbacks are lost,
        for an hour."""
        self.control(self.stack.stripe_url, "webhooks", {"deliver": False})
        self.lost_sms = payloads.twilio_sid("SM")
        self.sql("SELECT api.register_sms(%s, %s, 2)", self.orgs[0].org_id, self.lost_sms)
        # Twilio delivered it; its callbacks never reached us. (The day runs in seconds, so
        # reconciliation may ask about an SMS at once rather than after the 15-minute grace.)
        self.control(self.stack.twilio_url, "messages", [{"sid": self.lost_sms, "status": "delivered"}])
        self.db.execute("UPDATE billing.settings SET reconcile_sms_grace = interval '0'")
        self.lost_intent = self.top_up(self.orgs[2], 7_500)
        before = len(self.calls)
        for i in range(10):
            self.call(self.orgs[i % 3], 500 + i * 5, 75.0 + i, report=(i % 5 != 0))
        self.lost_calls = [c["id"] for c in self.calls[before:]][::5]
        self.control(self.stack.vapi_url, "calls", self.calls)
        self.control(self.stack.stripe_url, "webhooks", {"deliver": True})
        self.progress("webhook outage: 1 payment, 2 call reports and 1 SMS status never arrive")

    def reconcile(self):
        import subprocess
        import sys

        for provider, since in (("stripe", "1d"), ("vapi", "1d"), ("twilio", "1d")):
            done = subprocess.run(
                [sys.executable, "-m", "shim.cli", "reconcile", provider, "--since", since],
                env=self.stack.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            self.recovered[provider] = json.loads(done.stdout)
        self.progress("reconciliation recovered what the outage lost")

    def afternoon_burn(self):
        """Long calls drive Acme and Bolt below their recharge thresholds."""
        for i in range(10):
            self.call(self.orgs[0], 700 + i * 3, 900.0)
            if i < 6:
                self.call(self.orgs[1], 701 + i * 3, 600.0)
        self.wait_for(
            "Acme's auto-recharge to be credited",
            lambda: self.sql(
                "SELECT 1 FROM billing.recharge_claims WHERE org_id = %s AND status = 'succeeded'",
                self.orgs[0].org_id,
            ),
        )
        self.wait_for(
            "Bolt's declined recharge",
            lambda: self.sql(
                "SELECT 1 FROM billing.recharge_claims WHERE org_id = %s AND status = 'failed'",
                self.orgs[1].org_id,
            ),
        )
        self.progress("auto-recharge: Acme charged once, Bolt's card declined (cooling down)")

    def refund_and_dispute(self):
        self.control(
            self.stack.stripe_url, "refund", {"payment_intent": self.intents["Cedar Realty"], "amount": 2_500}
        )
        dispute = self.control(
            self.stack.stripe_url, "dispute", {"payment_intent": self.intents["Bolt Logistics"]}
        )["dispute"]
        self.control(self.stack.stripe_url, f"dispute_close/{dispute['id']}", {"status": "won"})
        self.progress("a partial refund (Cedar) and a dispute won (Bolt)")

    SCENES = (
        "open_accounts",
        "morning_top_ups",
        "autorecharge_settings",
        "calls_through_the_day",
        "sms_traffic",
        "webhook_outage",
        "reconcile",
        "afternoon_burn",
        "refund_and_dispute",
    )

    def play(self):
        for scene in self.SCENES:
            getattr(self, scene)()
