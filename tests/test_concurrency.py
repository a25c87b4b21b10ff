"""Concurrency, tested rather than hoped for: many connections on one wallet at once.

Each worker is a thread with its own connection acting as service_role; a barrier starts them
together. Afterwards balance = sum(entries) and held = sum(open holds), checked both against
the database and against what the workers were told.
"""

import random
import threading
from collections import Counter

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.db_helpers import one, open_wallet, wallet

CONNECTIONS = 16


def service_connection(db_url) -> psycopg.Connection:
    """A connection of its own, as the shim has: service_role, autocommit, bounded waits."""
    conn = psycopg.connect(db_url, autocommit=True, row_factory=dict_row)
    conn.execute("SET ROLE service_role")
    conn.execute("SET statement_timeout = '20s'")
    return conn


def run_together(db_url, workers: int, work) -> list:
    """Run work(index, conn, barrier) in `workers` threads, each with its own connection,
    released together; return their results in index order, re-raising the first error."""
    conns = [service_connection(db_url) for _ in range(workers)]
    barrier = threading.Barrier(workers, timeout=30)
    results: list = [None] * workers
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            results[index] = work(index, conns[index], barrier)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a worker hung"
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return results


def ledger_totals(db, org) -> dict:
    """The wallet next to what its entries and open holds add up to."""
    return one(
        db,
        "SELECT w.balance_minor, w.held_minor,"
        " (SELECT coalesce(sum(amount_minor), 0)::bigint FROM billing.ledger_entries WHERE org_id = w.org_id)"
        "   AS entries_total,"
        " (SELECT coalesce(sum(amount_minor), 0)::bigint FROM billing.holds"
        "   WHERE org_id = w.org_id AND status = 'open') AS open_holds_total"
        " FROM billing.wallets AS w WHERE w.org_id = %s",
        (org,),
    )


# ---------------------------------------------------------------------------- mixed hammering


def test_mixed_operations_on_one_wallet_keep_the_ledger_exact(db_url, db, service):
    """16 connections authorise, charge, release and top up one wallet at once; afterwards
    balance = sum(entries) = start + every applied amount, and held = sum(open holds) = the
    holds the workers left open."""
    start = 20_000
    org = open_wallet(service, balance_minor=start, debt_limit_minor=5_000, rate_per_minute_minor=60)
    ops_per_worker = 60

    def work(i, conn, barrier):
        rng = random.Random(i)
        moved, left_open, statuses = 0, {}, Counter()
        barrier.wait()
        for n in range(ops_per_worker):
            op = rng.choices(["authorize", "charge", "credit", "release"], [35, 30, 20, 15])[0]
            r = None
            if op == "authorize":
                call = f"w{i}-c{n}"
                r = one(conn, "SELECT * FROM api.authorize_call(%s, %s, %s)", (org, call, rng.randint(1, 3)))
                assert (r["status"], r["reason"]) in {
                    ("applied", None),
                    ("rejected", "insufficient_funds"),
                    ("rejected", "wallet_suspended"),
                }
                if r["status"] == "applied":
                    left_open[call] = r["amount_minor"]
            elif op == "charge":
                call = rng.choice(sorted(left_open)) if left_open else f"w{i}-unheld{n}"
                left_open.pop(call, None)
                r = one(
                    conn,
                    "SELECT * FROM api.deduct_call_credits(%s, %s, %s)",
                    (org, call, rng.randint(0, 240)),
                )
                assert r["status"] == "applied"
                moved += r["amount_minor"]
            elif op == "credit":
                r = one(
                    conn,
                    "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)",
                    (org, rng.randint(1, 300), f"w{i}-k{n}"),
                )
                assert r["status"] == "applied"
                moved += r["amount_minor"]
            elif left_open:
                call = rng.choice(sorted(left_open))
                r = one(conn, "SELECT * FROM api.release_call(%s, %s)", (org, call))
                assert (r["status"], r["amount_minor"]) == ("applied", left_open.pop(call))
            if r is not None:
                statuses[(op, r["status"])] += 1
        return moved, sum(left_open.values()), statuses

    results = run_together(db_url, CONNECTIONS, work)

    moved = sum(r[0] for r in results)
    still_held = sum(r[1] for r in results)
    totals = ledger_totals(db, org)
    assert totals["balance_minor"] == totals["entries_total"] == start + moved
    assert totals["held_minor"] == totals["open_holds_total"] == still_held
    statuses = sum((r[2] for r in results), Counter())
    assert statuses[("charge", "applied")] > 50 and statuses[("authorize", "applied")] > 50
    assert db.execute("SELECT * FROM api.ledger_invariant_violations()").fetchall() == []


# ---------------------------------------------------------------------------- the debt limit


def test_concurrent_authorisations_never_pass_the_debt_limit(db_url, db, service):
    """48 authorisations from 24 connections at once on a wallet with room for 15 holds:
    exactly 15 are applied, and balance - held never goes below -debt_limit."""
    balance, debt_limit, hold = 1_000, 500, 100
    org = open_wallet(service, balance_minor=balance, debt_limit_minor=debt_limit, rate_per_minute_minor=hold)
    workers, attempts = 24, 2

    def work(i, conn, barrier):
        barrier.wait()
        return [
            one(conn, "SELECT * FROM api.authorize_call(%s, %s, 1)", (org, f"w{i}-c{n}"))
            for n in range(attempts)
        ]

    results = [r for rs in run_together(db_url, workers, work) for r in rs]
    applied = [r for r in results if r["status"] == "applied"]
    refused = [r for r in results if r["status"] != "applied"]
    assert len(applied) * hold <= balance + debt_limit
    assert len(applied) == (balance + debt_limit) // hold == 15
    assert {(r["status"], r["reason"]) for r in refused} == {("rejected", "insufficient_funds")}
    totals = ledger_totals(db, org)
    assert totals["held_minor"] == totals["open_holds_total"] == 15 * hold
    assert totals["balance_minor"] - totals["held_minor"] >= -debt_limit


# ---------------------------------------------------------------------------- duplicates


def test_concurrent_deliveries_of_one_charge_apply_once(db_url, db, service):
    """16 connections deliver the same end-of-call report at once, five times over: each
    time exactly one is applied and the others are duplicates of that entry."""
    org = open_wallet(service, balance_minor=10_000)
    rounds = 5
    for n in range(rounds):
        one(service, "SELECT * FROM api.authorize_call(%s, %s, 5)", (org, f"call-{n}"))

    def work(i, conn, barrier):
        answers = []
        for n in range(rounds):
            barrier.wait()
            answers.append(one(conn, "SELECT * FROM api.deduct_call_credits(%s, %s, 90)", (org, f"call-{n}")))
        return answers

    results = run_together(db_url, CONNECTIONS, work)
    for n in range(rounds):
        answers = [worker[n] for worker in results]
        applied = [a for a in answers if a["status"] == "applied"]
        assert len(applied) == 1
        assert {(a["status"], a["entry_id"], a["amount_minor"]) for a in answers if a is not applied[0]} == {
            ("duplicate", applied[0]["entry_id"], -105)
        }
    w = wallet(db, org)
    assert (w["balance_minor"], w["held_minor"]) == (10_000 - rounds * 105, 0)
    assert (
        one(db, "SELECT count(*) AS n FROM billing.ledger_entries WHERE org_id = %s", (org,))["n"]
        == 1 + rounds
    )


@pytest.mark.parametrize("operation", ["deduct_call_credits", "authorize_call"])
def test_one_call_id_in_two_orgs_at_once_applies_to_one_org_only(db_url, db, service, operation):
    """Eight connections per org race the same call id: exactly one is applied; the rest of
    its org see a duplicate, the other org a conflict (other_org). Five rounds."""
    org_a = open_wallet(service, balance_minor=10_000)
    org_b = open_wallet(service, balance_minor=10_000)
    rounds = 5
    sql = {
        "deduct_call_credits": "SELECT * FROM api.deduct_call_credits(%s, %s, 60)",
        "authorize_call": "SELECT * FROM api.authorize_call(%s, %s, 2)",
    }[operation]

    def work(i, conn, barrier):
        org = org_a if i % 2 == 0 else org_b
        answers = []
        for n in range(rounds):
            barrier.wait()
            answers.append((org, one(conn, sql, (org, f"shared-{n}"))))
        return answers

    results = run_together(db_url, CONNECTIONS, work)
    for n in range(rounds):
        answers = [worker[n] for worker in results]
        winners = [(org, a) for org, a in answers if a["status"] == "applied"]
        assert len(winners) == 1
        winner_org = winners[0][0]
        for org, a in answers:
            if a is winners[0][1]:
                continue
            if org == winner_org:
                assert a["status"] == "duplicate"
            else:
                assert (a["status"], a["reason"], a["entry_id"]) == ("conflict", "other_org", None)
        ref = f"shared-{n}"
        entries = one(
            db,
            "SELECT count(*) AS n FROM billing.ledger_entries WHERE provider_ref = %s",
            (f"vapi:call:{ref}",),
        )["n"]
        holds = one(db, "SELECT count(*) AS n FROM billing.holds WHERE ref = %s", (ref,))["n"]
        assert (entries, holds) == ((1, 0) if operation == "deduct_call_credits" else (0, 1))
    for org in (org_a, org_b):
        totals = ledger_totals(db, org)
        assert totals["balance_minor"] == totals["entries_total"]
        assert totals["held_minor"] == totals["open_holds_total"]
