"""The shipped scrape configuration (ops/prometheus/prometheus.yml) authenticates: a real
Prometheus, given it with only the token file's path and the target changed, scrapes /metrics
(target up, billing gauges stored), and once the file holds another token its scrapes are
refused with 401 (target down). Skipped without the prometheus and promtool binaries (Debian's
`prometheus` package) unless REQUIRE_PROMTOOL=1, as tests/test_alert_rules.py does."""

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from shim.fakes.serve import free_port
from tests.conftest import SECRETS

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
SHIPPED_TOKEN_FILE = "/etc/prometheus/secrets/creditledger-metrics-token"
SHIPPED_TARGET = '"creditledger-shim:8080"'


def binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("REQUIRE_PROMTOOL") == "1":
        pytest.fail(f"REQUIRE_PROMTOOL=1 but {name} is not on PATH (apt-get install prometheus)")
    pytest.skip(f"{name} is not on PATH (apt-get install prometheus)")


def render(tmp_path: Path, shim_url: str, token_file: Path) -> Path:
    """The shipped file with the token file, the target and the intervals made local."""
    text = CONFIG.read_text()
    assert SHIPPED_TOKEN_FILE in text and SHIPPED_TARGET in text
    text = text.replace(SHIPPED_TOKEN_FILE, str(token_file))
    text = text.replace(SHIPPED_TARGET, f'"{shim_url.removeprefix("http://")}"')
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s")
    shutil.copy(CONFIG.with_name("alerts.yml"), tmp_path / "alerts.yml")
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(text)
    return rendered


def target_state(api: str) -> tuple[str, str]:
    """(health, lastError) of the creditledger target once it has been scraped at least once."""
    targets = requests.get(f"{api}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    (target,) = [t for t in targets if t["labels"]["job"] == "creditledger"]
    return target["health"], target["lastError"]


def wait_for(api: str, health: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    state = ("", "")
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, KeyError, ValueError):  # starting
            state = target_state(api)
        if state[0] == health:
            return state[1]
        time.sleep(0.2)
    pytest.fail(f"target never became {health}: {state}")


@pytest.fixture
def prometheus(tmp_path, shim_url):
    """A Prometheus scraping the shim with the shipped configuration; yields (api, token_file)."""
    promtool, server = binary("promtool"), binary("prometheus")
    token_file = tmp_path / "metrics-token"
    token_file.write_text(SECRETS["metrics_token"] + "\n")  # a trailing newline, as `echo` leaves
    config = render(tmp_path, shim_url, token_file)
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_port()
    argv = [
        server,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}", token_file
    finally:
        process.terminate()
        process.wait(30)


def test_prometheus_scrapes_with_the_token_and_is_refused_without(prometheus):
    api, token_file = prometheus
    assert wait_for(api, "up") == ""
    query = requests.get(f"{api}/api/v1/query", params={"query": "creditledger_database_up"}, timeout=5)
    (sample,) = query.json()["data"]["result"]
    assert sample["value"][1] == "1"

    token_file.write_text("another-token\n")  # read again at the next scrape: no reload
    assert "401" in wait_for(api, "down")
