"""The database against a model: a Hypothesis state machine runs credits, authorisations,
charges, releases and retries on a wallet, and after every step the wallet (balance, held,
status) and every answer (status, reason, amount, balance) must match a few lines of Python.

Each example opens a new wallet (org ids and call ids are fresh uuids) in the test's
database, so examples need no cleanup.
"""

import uuid
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.db_helpers import one

# Mostly fresh credit keys (so money arrives), sometimes a reused one (duplicate or conflict).
KEYS = ["fresh", "fresh", "fresh", "key-0", "key-1"]
CALLS = [f"call-{i}" for i in range(8)]


def call_cost(duration: int, increment: int, rate: int) -> int:
    """The contract's price: duration rounded up to the increment, then ceil(s x rate / 60)."""
    billed = -(-duration // increment) * increment
    return -(-billed * rate // 60)


@dataclass
class Hold:
    minutes: int
    amount: int
    status: str  # open, captured, released, rejected
    reason: str | None


@dataclass
class Wallet:
    """What the ledger should say, kept by hand."""

    debt_limit: int
    rate: int
    increment: int
    balance: int = 0
    held: int = 0
    status: str = "active"
    credits: dict = field(default_factory=dict)  # key -> (amount, entry_id, reason)
    charges: dict = field(default_factory=dict)  # call -> (duration, amount, entry_id, reason)
    holds: dict = field(default_factory=dict)  # call -> Hold

    def over_limit(self) -> bool:
        return self.balance < -self.debt_limit

    def move(self, amount: int) -> str | None:
        """Post an amount; suspend on a debit past the limit, reactivate on a credit within it."""
        self.balance += amount
        if self.over_limit() and self.status == "active" and amount < 0:
            self.status = "suspended"
        elif not self.over_limit() and self.status == "suspended" and amount > 0:
            self.status = "active"
        return "debt_limit_exceeded" if self.over_limit() else None


class LedgerMachine(RuleBasedStateMachine):
    """One wallet per example; `service` and `db` are set by the test before running."""

    service = None
    db = None

    def __init__(self):
        super().__init__()
        self.org = None
        self.model: Wallet | None = None
        self.prefix = uuid.uuid4().hex[:12]  # call ids are unique across all orgs
        self.history: list[tuple] = []  # requests answered applied or rejected: retried later

    @initialize(
        debt_limit=st.sampled_from([0, 100, 1000]),
        rate=st.sampled_from([0, 7, 70, 150]),
        increment=st.sampled_from([1, 6, 30, 60]),
    )
    def open(self, debt_limit, rate, increment):
        self.org = uuid.uuid4()
        one(self.service, "SELECT * FROM api.open_wallet(%s, 'usd', %s::bigint)", (self.org, debt_limit))
        one(
            self.service,
            "SELECT * FROM api.set_pricing(%s, %s::bigint, %s::integer)",
            (self.org, rate, increment),
        )
        self.model = Wallet(debt_limit=debt_limit, rate=rate, increment=increment)

    # ------------------------------------------------------------------ the operations

    def _check(self, got: dict, status: str, reason=None, amount=..., entry_id=...):
        expected = {"status": status, "reason": reason, "balance_minor": self.model.balance}
        if amount is not ...:
            expected["amount_minor"] = amount
        if entry_id is not ...:
            expected["entry_id"] = entry_id
        assert {k: got[k] for k in expected} == expected, (got, expected)

    def do_credit(self, key, amount):
        got = one(
            self.service, "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)", (self.org, amount, key)
        )
        m = self.model
        if key in m.credits:
            first_amount, entry_id, reason = m.credits[key]
            if first_amount == amount:
                self._check(got, "duplicate", reason, first_amount, entry_id)
            else:
                self._check(got, "conflict", "different_request", first_amount, entry_id)
            return got
        reason = m.move(amount)
        self._check(got, "applied", reason, amount)
        m.credits[key] = (amount, got["entry_id"], reason)
        return got

    def do_authorize(self, call, minutes):
        got = one(
            self.service,
            "SELECT * FROM api.authorize_call(%s, %s, %s::integer)",
            (self.org, self.ref(call), minutes),
        )
        m = self.model
        if call in m.holds:
            h = m.holds[call]
            if h.minutes == minutes:
                self._check(got, "duplicate", h.reason, h.amount, None)
            else:
                self._check(got, "conflict", "different_request", h.amount, None)
            return got
        if call in m.charges:
            _, amount, entry_id, _ = m.charges[call]
            self._check(got, "duplicate", "already_charged", amount, entry_id)
            return got
        amount = minutes * m.rate
        if m.status == "suspended":
            reason = "wallet_suspended"
        elif m.balance - m.held - amount < -m.debt_limit:
            reason = "insufficient_funds"
        else:
            reason = None
        m.holds[call] = Hold(minutes, amount, "rejected" if reason else "open", reason)
        if reason is None:
            m.held += amount
        self._check(got, "rejected" if reason else "applied", reason, amount, None)
        return got

    def do_deduct(self, call, duration):
        got = one(
            self.service,
            "SELECT * FROM api.deduct_call_credits(%s, %s, %s::integer)",
            (self.org, self.ref(call), duration),
        )
        m = self.model
        if call in m.charges:
            first_duration, amount, entry_id, reason = m.charges[call]
            if first_duration == duration:
                self._check(got, "duplicate", reason, amount, entry_id)
            else:
                self._check(got, "conflict", "different_request", amount, entry_id)
            return got
        cost = call_cost(duration, m.increment, m.rate)
        h = m.holds.get(call)
        if h is not None and h.status == "open":
            h.status = "captured"
            m.held -= h.amount
        reason = m.move(-cost)
        self._check(got, "applied", reason, -cost)
        m.charges[call] = (duration, -cost, got["entry_id"], reason)
        return got

    def do_release(self, call):
        got = one(self.service, "SELECT * FROM api.release_call(%s, %s)", (self.org, self.ref(call)))
        m = self.model
        h = m.holds.get(call)
        if h is None:
            self._check(got, "rejected", "unknown_call", None, None)
        elif h.status == "open":
            h.status = "released"
            m.held -= h.amount
            self._check(got, "applied", None, h.amount, None)
        else:
            reason = {"captured": "already_charged", "rejected": h.reason}.get(h.status)
            self._check(got, "duplicate", reason, h.amount, None)
        return got

    def ref(self, call: str) -> str:
        return f"{self.prefix}-{call}"

    def remember(self, request: tuple, got: dict):
        """Keep a request to retry later: one that was applied, or refused by a business rule
        (a release of an unknown call is not remembered: the call may be authorised later)."""
        if got["status"] == "applied" or (got["status"] == "rejected" and request[0] != "release"):
            self.history.append(request)

    # ------------------------------------------------------------------ rules

    @rule(key=st.sampled_from(KEYS), amount=st.sampled_from([1, 50, 250, 600]))
    def credit(self, key, amount):
        if key == "fresh":
            key = f"fresh-{len(self.model.credits)}"
        self.remember(("credit", key, amount), self.do_credit(key, amount))

    @rule(call=st.sampled_from(CALLS), minutes=st.integers(1, 3))
    def authorize(self, call, minutes):
        self.remember(("authorize", call, minutes), self.do_authorize(call, minutes))

    @rule(call=st.sampled_from(CALLS), duration=st.sampled_from([0, 1, 61, 95, 300, 900]))
    def deduct(self, call, duration):
        self.remember(("deduct", call, duration), self.do_deduct(call, duration))

    @rule(data=st.data())
    def release(self, data):
        """Release a call that was authorised (applied or refused), or one that never was."""
        call = data.draw(st.sampled_from(sorted(self.model.holds) + ["call-never-authorised"]))
        self.remember(("release", call), self.do_release(call))

    @rule(data=st.data())
    def retry_an_answered_request(self, data):
        """Any request answered applied or rejected, sent again, is a duplicate."""
        if not self.history:
            return
        request = data.draw(st.sampled_from(self.history))
        handler = {
            "credit": self.do_credit,
            "authorize": self.do_authorize,
            "deduct": self.do_deduct,
            "release": self.do_release,
        }[request[0]]
        assert handler(*request[1:])["status"] == "duplicate"

    # ------------------------------------------------------------------ after every step

    @invariant()
    def wallet_matches_the_model(self):
        if self.model is None:
            return
        w = one(
            self.db,
            "SELECT balance_minor, held_minor, status FROM billing.wallets WHERE org_id = %s",
            (self.org,),
        )
        assert (w["balance_minor"], w["held_minor"], w["status"]) == (
            self.model.balance,
            self.model.held,
            self.model.status,
        )

    @invariant()
    def ledger_invariants_hold(self):
        if self.model is None:
            return
        broken = self.db.execute(
            "SELECT * FROM api.ledger_invariant_violations() WHERE org_id = %s", (self.org,)
        ).fetchall()
        assert broken == []


def test_ledger_behaves_like_the_model(service, db):
    """Random sequences of money operations leave the database exactly where the model is."""
    LedgerMachine.service, LedgerMachine.db = service, db
    try:
        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        LedgerMachine.service = LedgerMachine.db = None
    wallets = db.execute("SELECT count(*) AS n FROM billing.wallets").fetchone()["n"]
    assert wallets >= 25  # the examples really ran, each on its own wallet


def test_model_prices_calls_like_the_contract():
    """The model's pricing is the contract's (so that agreement with it means something)."""
    assert call_cost(61, 1, 70) == 72
    assert call_cost(0, 60, 70) == 0
    assert call_cost(1, 60, 70) == 70
    assert call_cost(61, 60, 70) == 140
    assert call_cost(13, 6, 7) == 3
