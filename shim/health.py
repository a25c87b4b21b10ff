"""Billing health for people and scrapers: the numbers of api.health_metrics() as Prometheus
gauges on /metrics, and `creditledger health` as a report whose exit status says whether any
alert fires (for cron, Kubernetes probes and CI smoke tests)."""

import logging

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shim.queries import QUERIES
from shim.recent import Recent

log = logging.getLogger(__name__)

# A scrape reuses a health evaluation younger than this: a third of the 15 s scrape interval, so
# numbers stay current, while scrapes by several Prometheus replicas, or by anyone holding the
# token, cost the database at most one evaluation per worker per 5 s.
SCRAPE_CACHE_SECONDS = 5.0


def read(pool) -> tuple[list[dict], list[dict]]:
    """The metric rows and the alert rows, from one evaluation of api.health_metrics()."""
    with pool.connection() as conn:
        health = conn.execute(QUERIES["health_report"]).fetchone()["report"]
    return health["metrics"], health["alerts"]


class BillingHealthCollector(Collector):
    """Queried at a scrape, at most once per SCRAPE_CACHE_SECONDS (the SQL is built to be cheap
    enough for a 15 s interval, not for a request flood)."""

    def __init__(self, pool, max_age: float = SCRAPE_CACHE_SECONDS):
        self.pool = pool
        self.read = Recent(lambda: read(pool), max_age)

    def collect(self):
        up = GaugeMetricFamily("creditledger_database_up", "1 when the billing database answered the scrape")
        try:
            metrics, alerts = self.read()
        except Exception as exc:  # a scrape must still answer, saying the database is down
            log.warning("health scrape failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = {}
        for row in metrics:
            name = f"creditledger_{row['metric']}"
            family = families.setdefault(
                name, GaugeMetricFamily(name, row["metric"].replace("_", " "), labels=["provider"])
            )
            family.add_metric([row["provider"] or ""], row["value"])
        yield from families.values()
        firing = GaugeMetricFamily(
            "creditledger_alert_firing",
            "1 when the alert's condition holds now",
            labels=["alert", "provider"],
        )
        for row in alerts:
            firing.add_metric([row["alert"], row["provider"] or ""], 1 if row["firing"] else 0)
        yield firing


def report(pool, compact: bool = False) -> tuple[str, bool]:
    """A readable report and whether any alert fires; compact leaves out zero metrics and
    alerts that do not fire."""
    metrics, alerts = read(pool)
    lines = ["billing health", "=============="]
    for row in metrics:
        if compact and not row["value"]:
            continue
        label = f"{row['metric']}{'{' + row['provider'] + '}' if row['provider'] else ''}"
        lines.append(f"  {label:<48} {row['value']:>14.3f}".rstrip("0").rstrip("."))
    lines += ["", "alerts", "======"]
    firing = [a for a in alerts if a["firing"]]
    for row in alerts:
        if compact and not row["firing"]:
            continue
        state = "FIRING" if row["firing"] else "ok"
        where = f"{{{row['provider']}}}" if row["provider"] else ""
        lines.append(
            f"  {state:<7} {row['alert']}{where}: value {row['value']:g}, threshold {row['threshold']:g}"
        )
    lines.append("")
    lines.append(f"{len(firing)} alert(s) firing" if firing else "all clear")
    return "\n".join(lines), bool(firing)
