"""`creditledger demo`: bring the stack up, play the day, print the report, stop everything."""

import sys
import time
from pathlib import Path

from shim.demo.day import Day
from shim.demo.report import balance_chart, ledger_summary, recovery_summary
from shim.demo.stack import Stack
from shim.health import report as health_report
from shim.pool import open_pool


def progress_bar(total: int):
    """A one-line progress bar on a terminal, one line per step elsewhere (CI logs)."""
    state = {"done": 0, "started": time.monotonic()}

    def step(label: str):
        state["done"] += 1
        filled = int(30 * state["done"] / total)
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {state['done']}/{total} "
            f"{time.monotonic() - state['started']:5.1f}s  {label}"
        )
        if sys.stdout.isatty():
            print(f"\r\033[K{line}", end="\n" if state["done"] == total else "", flush=True)
        else:
            print(line, flush=True)

    return step


def run(out_dir: Path) -> int:
    """Play the day and write out_dir/report.txt and out_dir/balances.png."""
    started = time.monotonic()
    print("starting: embedded PostgreSQL, migrations, gunicorn, worker, fake Stripe and Vapi ...", flush=True)
    with Stack(out_dir) as stack:
        day = Day(stack, progress_bar(len(Day.SCENES)))
        day.play()
        with open_pool(stack.db_url, max_size=2) as pool:
            health_text, _ = health_report(pool, compact=True)
        violations = day.sql("SELECT * FROM api.ledger_invariant_violations()")
        lines = [
            "",
            "LEDGER",
            "======",
            *ledger_summary(day.db, [*day.orgs, day.dune]),
            "",
            "CALL ADMISSION",
            "==============",
            *day.admission,
            "",
            "RECOVERED BY RECONCILIATION",
            "===========================",
            *recovery_summary(day.recovered),
            "",
            f"ledger invariants (balance = sum of entries, held = open holds): {violations or 'OK'}",
            "",
            health_text,
        ]
        chart = out_dir / "balances.png"
        balance_chart(day.db, [*day.orgs, day.dune], chart)
        day.db.close()
    text = "\n".join(lines)
    (out_dir / "report.txt").write_text(text + "\n")
    print(text)
    print(f"\nreport: {out_dir / 'report.txt'}   chart: {chart}   ({time.monotonic() - started:.0f}s)")
    return 1 if violations else 0
