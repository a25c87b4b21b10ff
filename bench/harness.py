"""The bench harness: rows, pgbench runs, latency from pgbench's -l logs, the markdown table.

A row is a name, a function that measures it (returning a Measurement), and optionally the name
of the baseline row it is a ratio to and the minimum ratio it must reach. run.py holds the
pgbench rows; http_rows.py is where the HTTP rows go (same Row and Measurement types).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"

# Seeded orgs have uuids pgbench can write: this prefix, then 12 decimal digits (valid hex),
# ORG_BASE + n. Many-org wallets are n = 1..orgs, the hot org n = 0, the hold/charge org n = orgs+1.
ORG_PREFIX = "00000000-0000-4000-8000-"
ORG_BASE = 100_000_000_000


def org_suffix(n: int) -> int:
    """The number pgbench scripts receive as :org for seeded org n."""
    return ORG_BASE + n


def org_uuid(n: int) -> str:
    """The uuid of seeded org n (SQL: ('00000000-0000-4000-8000-' || :org)::uuid)."""
    return f"{ORG_PREFIX}{org_suffix(n)}"


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database (yoyo and pgbench both take URLs)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


class BenchError(RuntimeError):
    """A row could not be measured (pgbench failed, a client aborted, ...)."""


@dataclass
class Measurement:
    """What one row measured: throughput, and per-transaction latencies in microseconds."""

    tps: float
    latencies_us: list[int] = field(default_factory=list)
    transactions: int = 0
    failed: int = 0
    clients: int = 0

    def percentile_ms(self, q: float) -> float | None:
        """The q-th percentile (0-100, nearest rank) of the latencies, in milliseconds."""
        if not self.latencies_us:
            return None
        ordered = sorted(self.latencies_us)
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
        return ordered[int(rank) - 1] / 1000.0


@dataclass
class Row:
    """One line of the table.

    `measure(ctx)` returns a Measurement. `baseline` names the row this one is a ratio to (None:
    it is a baseline itself); `target` is the minimum ratio; `unit` labels the TPS column when a
    row's transaction is not one commit (e.g. one call = authorize + charge); `key` is what
    BENCH_ONLY matches.
    """

    name: str
    measure: Callable[[Context], Measurement]
    baseline: str | None = None
    target: float | None = None
    unit: str = "tps"
    note: str = ""
    key: str = ""  # short id for BENCH_ONLY; defaults to the name, slugified

    def __post_init__(self) -> None:
        if not self.key:
            self.key = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Context:
    """Where and how rows run: URLs of the prepared databases, pgbench, durations, clients."""

    admin_url: str
    ledger_url: str
    tpcb_url: str
    pgbench: Path
    seconds: int
    clients: int
    threads: int
    hold_clients: int
    orgs: int
    log_dir: Path
    can_checkpoint: bool = True
    round: int = 1
    extra: dict = field(default_factory=dict)

    def pgbench_run(
        self,
        label: str,
        url: str,
        *,
        script: Path | None = None,
        builtin: str | None = None,
        clients: int | None = None,
        defines: dict[str, object] | None = None,
    ) -> Measurement:
        """Run pgbench for `seconds` with a script file or a built-in, and read its -l log."""
        clients = clients or self.clients
        label = f"{label}-r{self.round}"
        prefix = self.log_dir / label
        for old in self.log_dir.glob(f"{label}.*"):
            old.unlink()
        cmd: list[str] = [
            str(self.pgbench),
            "--no-vacuum",
            "--protocol=simple",  # ingest_webhook.sql substitutes variables inside a literal
            f"--client={clients}",
            f"--jobs={min(self.threads, clients)}",
            f"--time={self.seconds}",
            "--log",
            f"--log-prefix={prefix}",
        ]
        if script is not None:
            cmd.append(f"--file={script}")
        if builtin is not None:
            cmd.append(f"--builtin={builtin}")
        for key, value in (defines or {}).items():
            cmd.append(f"--define={key}={value}")
        cmd.append(url)
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=self.seconds + 300,
            env={**os.environ, "PGAPPNAME": f"bench:{label}"},
        )
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise BenchError(f"pgbench exited {proc.returncode}: " + " | ".join(lines[-3:]))
        tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", proc.stdout)
        done = re.search(r"number of transactions actually processed: (\d+)", proc.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
        if tps is None or done is None:
            raise BenchError("could not read pgbench's summary: " + proc.stdout[-300:])
        latencies, log_failed = read_latency_logs(sorted(self.log_dir.glob(f"{label}.*")))
        return Measurement(
            tps=float(tps.group(1)),
            latencies_us=latencies,
            transactions=int(done.group(1)),
            failed=int(failed.group(1)) if failed else log_failed,
            clients=clients,
        )


def read_latency_logs(paths: Sequence[Path]) -> tuple[list[int], int]:
    """Latencies (µs) of every transaction in pgbench -l logs, and how many failed.

    Each line is `client_id transaction_no time script_no time_epoch time_us [...]`; `time` is the
    latency in µs, or a word (`failed`, `skipped`, `serialization`, ...) for a transaction that
    did not complete.
    """
    latencies: list[int] = []
    failed = 0
    for path in paths:
        with path.open() as log:
            for line in log:
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2].isdigit():
                    latencies.append(int(fields[2]))
                else:
                    failed += 1
    return latencies, failed


@dataclass
class Result:
    """A row and what came of it, round by round: a measurement, or the error that prevented one
    (None in `measurements` for that round)."""

    row: Row
    measurements: list[Measurement | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def measured(self) -> list[Measurement]:
        return [m for m in self.measurements if m is not None]

    def tps(self) -> float | None:
        """Median TPS over the rounds that measured something."""
        values = [m.tps for m in self.measured]
        return statistics.median(values) if values else None

    def percentile_ms(self, q: float) -> float | None:
        """Percentile of every transaction of every round."""
        pooled = Measurement(tps=0, latencies_us=[x for m in self.measured for x in m.latencies_us])
        return pooled.percentile_ms(q)

    @property
    def failed(self) -> int:
        return sum(m.failed for m in self.measured)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def round_ratios(result: Result, by_name: dict[str, Result]) -> list[float]:
    """TPS over the baseline's TPS, per round in which both were measured."""
    base = by_name.get(result.row.baseline or "")
    if base is None:
        return []
    return [
        m.tps / b.tps
        for m, b in zip(result.measurements, base.measurements, strict=False)
        if m is not None and b is not None and b.tps > 0
    ]


def ratio_of(result: Result, by_name: dict[str, Result]) -> float | None:
    """The median per-round ratio to the baseline (None when there is none)."""
    ratios = round_ratios(result, by_name)
    return statistics.median(ratios) if ratios else None


def target_met(result: Result, by_name: dict[str, Result]) -> bool | None:
    """True or False when the row has a target; None when it has none (or was not measured)."""
    ratio = ratio_of(result, by_name)
    if result.row.target is None or ratio is None:
        return None
    return ratio >= result.row.target


def render_table(results: Sequence[Result]) -> str:
    """The markdown table: | benchmark | TPS | baseline | ratio | target | p50 ms | p99 ms |."""
    by_name = {r.row.name: r for r in results}
    lines = [
        "| benchmark | TPS | baseline | ratio | target | p50 ms | p99 ms |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for r in results:
        tps_value = r.tps()
        if tps_value is None:
            lines.append(f"| {r.row.name} | error | {r.row.baseline or '—'} | — | — | — | — |")
            continue
        tps = f"{tps_value:,.0f}" + ("" if r.row.unit == "tps" else f" {r.row.unit}")
        ratio = ratio_of(r, by_name)
        met = target_met(r, by_name)
        target = "—"
        if r.row.target is not None:
            target = f"≥ {r.row.target:g}x " + ("met" if met else "**MISSED**")
        lines.append(
            f"| {r.row.name} | {tps} | {r.row.baseline or '—'} | "
            f"{'—' if ratio is None else f'{ratio:.2f}x'} | {target} | "
            f"{_fmt(r.percentile_ms(50))} | {_fmt(r.percentile_ms(99))} |"
        )
    return "\n".join(lines)
