"""Monitoring as code: the Prometheus rules, their promtool unit tests, the Grafana dashboard and
the runbook must agree with each other and with what the code exports.

- `promtool check rules` and `promtool test rules` run for real when promtool is on PATH (Debian's
  `prometheus` package ships it). Without it these tests skip, unless REQUIRE_PROMTOOL=1 (CI sets
  it), which turns a missing promtool into a failure.
- Every alert of api.health_alerts() (the VALUES list in db/functions/80_health.sql) has a rule
  with the same metric, comparison and threshold, and a `## <AlertName>` section in
  docs/runbook.md; every rule is unit-tested both firing and silent.
- Every metric named by a rule or a dashboard panel is one the code exports: parsed from
  80_health.sql, shim/health.py and shim/metrics.py, and checked once against a live /metrics.

PyYAML is not a dependency: the rules file is read by a small reader of its own layout below;
promtool (above) is what proves it is valid YAML and valid Prometheus.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.senders import METRICS_AUTH

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "creditledger-billing.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
HEALTH_SQL = ROOT / "db" / "functions" / "80_health.sql"
HEALTH_PY = ROOT / "shim" / "health.py"
METRICS_PY = ROOT / "shim" / "metrics.py"

SEVERITIES = {"critical", "warning", "info"}
# Labels the exported series carry (health gauges: provider; alert_firing: alert, provider;
# HTTP metrics: endpoint, code, le), plus the ones every Prometheus target adds.
KNOWN_LABELS = {"provider", "alert", "endpoint", "code", "le", "instance", "job"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


# ---------------------------------------------------------------------------- promtool


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("REQUIRE_PROMTOOL") == "1":
        pytest.fail("REQUIRE_PROMTOOL=1 but promtool is not on PATH (apt-get install prometheus)")
    pytest.skip("promtool is not on PATH (apt-get install prometheus); REQUIRE_PROMTOOL=1 makes this fail")


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_promtool_check_rules():
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass():
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ---------------------------------------------------------------------------- readers


def parse_rules(text: str) -> list[dict]:
    """Each `- alert:` rule of alerts.yml as a flat dict of its scalar fields (alert, expr, for,
    severity, service, summary, description, runbook_url). Block scalars (| and >) are joined,
    literal ones with newlines and folded ones with spaces; quotes are stripped."""
    lines = text.splitlines()
    rules: list[dict] = []
    i = 0
    while i < len(lines):
        start = re.match(r"^(\s*)- alert:\s*(\S+)\s*$", lines[i])
        i += 1
        if not start:
            continue
        rule, dash = {"alert": start[2]}, len(start[1])
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= dash:
                break
            field = re.match(r"^\s*([A-Za-z_]+):\s*(.*?)\s*$", line)
            i += 1
            if not field:
                continue
            key, value = field[1], field[2]
            if value in ("|", "|-", ">", ">-"):
                block = []
                while i < len(lines) and (
                    not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
                ):
                    block.append(lines[i].strip())
                    i += 1
                value = ("\n" if value.startswith("|") else " ").join(b for b in block if b)
            elif len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            if value:
                rule[key] = value
        rules.append(rule)
    return rules


def rules() -> dict[str, dict]:
    parsed = parse_rules(RULES.read_text())
    names = [r["alert"] for r in parsed]
    assert len(names) == len(set(names)), f"duplicate alert names in {RULES.name}: {names}"
    assert len(parsed) == RULES.read_text().count("- alert:")
    return {r["alert"]: r for r in parsed}


def sql_function_body(name: str) -> str:
    sql = HEALTH_SQL.read_text()
    start = sql.index(f"FUNCTION {name}(")
    return sql[start : sql.index("$$;", start)]


def sql_alert_rules() -> list[tuple[str, str, float, bool]]:
    """(alert, metric, threshold, fires_above) from the VALUES list of billing._evaluate_alerts()."""
    body = sql_function_body("billing._evaluate_alerts")
    values = body[body.index("rules(alert, metric, threshold, fires_above)") : body.index("SELECT r.alert")]
    found = []
    for alert, metric, threshold, above in re.findall(
        r"\('(\w+)',\s*'(\w+)',\s*([0-9.\s*]+?),\s*(true|false)\)", values
    ):
        product = 1.0
        for factor in threshold.split("*"):
            product *= float(factor)
        found.append((alert, metric, product, above == "true"))
    assert len(found) == values.count("('"), "a row of the VALUES list was not understood"
    assert found, "no alert rules found in billing._evaluate_alerts()"
    return found


def sql_metric_names() -> set[str]:
    """The metric names api.health_metrics() returns ('x_' || win expanded over its windows)."""
    body = sql_function_body("api.health_metrics")
    windows = re.findall(r"\('(\w+)',\s*interval '[^']+'\)", body)
    assert windows, "the windows of api.health_metrics() were not found"
    names = set(re.findall(r"SELECT '([a-z0-9_]+)',", body))
    for prefix in re.findall(r"SELECT '([a-z0-9_]+)' \|\| win\b", body):
        names |= {prefix + window for window in windows}
    assert "webhook_success_ratio_1h" in names and "ledger_invariant_violations" in names
    return names


def exported_metric_names() -> set[str]:
    """Every series name /metrics can carry, from the code that exports them."""
    health_py = HEALTH_PY.read_text()
    assert "f\"creditledger_{row['metric']}\"" in health_py, "shim/health.py no longer prefixes creditledger_"
    names = {f"creditledger_{m}" for m in sql_metric_names()}
    names |= set(re.findall(r'GaugeMetricFamily\(\s*"(creditledger_\w+)"', health_py))
    metrics_py = METRICS_PY.read_text()
    for counter in re.findall(r'Counter\(\s*"(\w+)"', metrics_py):
        base = counter.removesuffix("_total")
        names |= {f"{base}_total", f"{base}_created"}
    for histogram in re.findall(r'Histogram\(\s*"(\w+)"', metrics_py):
        names |= {f"{histogram}{suffix}" for suffix in ("_bucket", "_count", "_sum", "_created")}
    assert {
        "creditledger_database_up",
        "creditledger_alert_firing",
        "creditledger_http_requests_total",
        "creditledger_http_request_seconds_bucket",
    } <= names
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bcreditledger_[a-z0-9_]+", expr))


def label_names_in(expr: str) -> set[str]:
    """Labels named in grouping clauses and selectors."""
    names = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    return names - PROMQL_WORDS


def runbook_sections() -> set[str]:
    return set(re.findall(r"^## (\S+)\s*$", RUNBOOK.read_text(), flags=re.MULTILINE))


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() if p["type"] != "row" for t in p["targets"]]


# ---------------------------------------------------------------------------- rules vs SQL, docs


def test_every_sql_alert_has_a_rule_and_a_runbook_section():
    sql_alerts = {alert for alert, *_ in sql_alert_rules()}
    missing_rules = sql_alerts - set(rules())
    missing_sections = sql_alerts - runbook_sections()
    assert not missing_rules, f"api.health_alerts() alerts without a rule in {RULES.name}: {missing_rules}"
    assert not missing_sections, (
        f"api.health_alerts() alerts without a section in docs/runbook.md: {missing_sections}"
    )


def test_rule_thresholds_match_api_health_alerts():
    """The same metric, comparison and threshold as the SQL, so `creditledger health` and
    Prometheus fire on the same numbers."""
    by_name = rules()
    for alert, metric, threshold, fires_above in sql_alert_rules():
        expr = by_name[alert]["expr"]
        match = re.fullmatch(rf"creditledger_{metric}\s*([<>])\s*([0-9.e+]+)", expr.strip())
        assert match, f"{alert}: expected `creditledger_{metric} <op> <threshold>`, got {expr!r}"
        assert match[1] == (">" if fires_above else "<"), f"{alert}: comparison differs from the SQL"
        assert float(match[2]) == threshold, (
            f"{alert}: threshold {match[2]} differs from the SQL's {threshold}"
        )


def test_every_rule_is_labelled_annotated_and_documented():
    sections = runbook_sections()
    for name, rule in rules().items():
        assert rule.get("severity") in SEVERITIES, f"{name}: severity label missing or unknown"
        assert rule.get("service") == "creditledger", f"{name}: service label missing"
        assert rule.get("summary") and rule.get("description"), f"{name}: summary/description missing"
        assert rule.get("runbook_url") == f"docs/runbook.md#{name.lower()}", f"{name}: runbook_url"
        assert name in sections, f"{name}: no `## {name}` section in docs/runbook.md"


def test_every_rule_is_unit_tested_firing_and_silent():
    text = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels", text))
    silent = set(re.findall(r"alertname:\s*(\w+),?\s*\n?\s*exp_alerts:\s*\[\]", text))
    for name in rules():
        assert name in firing, f"{name}: no promtool test where it fires"
        assert name in silent, f"{name}: no promtool test where it stays silent"


# ---------------------------------------------------------------------------- metric names


def test_rules_use_only_exported_metrics_and_labels():
    exported = exported_metric_names()
    for name, rule in rules().items():
        used = metric_names_in(rule["expr"])
        assert used, f"{name}: expression names no creditledger metric"
        assert used <= exported, f"{name}: unknown metrics {used - exported}"
        assert label_names_in(rule["expr"]) <= KNOWN_LABELS, f"{name}: unknown labels"


def test_dashboard_uses_only_exported_metrics_and_labels():
    exported = exported_metric_names()
    for expr in dashboard_exprs():
        used = metric_names_in(expr)
        assert used, f"panel expression names no creditledger metric: {expr}"
        assert used <= exported, f"unknown metrics {used - exported} in {expr}"
        assert label_names_in(expr) <= KNOWN_LABELS, f"unknown labels in {expr}"


def test_dashboard_covers_the_billing_metrics():
    used = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    required = {
        "creditledger_database_up",
        "creditledger_webhook_success_ratio_1h",
        "creditledger_webhook_backlog",
        "creditledger_webhook_backlog_oldest_seconds",
        "creditledger_webhook_dead_letters",
        "creditledger_webhook_unattributed",
        "creditledger_ledger_invariant_violations",
        "creditledger_reconciliation_age_seconds",
        "creditledger_open_discrepancies",
        "creditledger_recharge_failures_24h",
        "creditledger_recharge_pending",
        "creditledger_auto_recharge_disabled",
        "creditledger_wallets_suspended",
        "creditledger_wallets_below_low_balance",
        "creditledger_http_requests_total",
        "creditledger_http_request_seconds_bucket",
    }
    assert required <= used, f"no panel for {required - used}"
    assert any("histogram_quantile(0.99" in e for e in dashboard_exprs()), "no p99 latency panel"


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no queries"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_exported_names_match_a_live_scrape(client):
    """The names parsed from the code are what a real /metrics carries (after one request, so that
    the labelled HTTP series exist)."""
    from prometheus_client.parser import text_string_to_metric_families

    assert client.get("/healthz").status_code == 200
    answer = client.get("/metrics", headers=METRICS_AUTH)
    assert answer.status_code == 200
    live = {
        sample.name
        for family in text_string_to_metric_families(answer.get_data(as_text=True))
        for sample in family.samples
    }
    assert {n for n in live if n.startswith("creditledger_")} == exported_metric_names()
