"""`make demo` end to end, on the test server: the day plays, the books balance, the report and
the chart are written, and every process it started is gone afterwards."""

import os
import subprocess

from shim.demo.run import run


def test_demo_day_plays_and_reconciles(server_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", server_url)
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "report.txt").read_text()
    assert "ledger invariants (balance = sum of entries, held = open holds): OK" in report
    runs = {line.split()[0]: line for line in report.splitlines() if " run #" in line}
    assert "recovered 1," in runs["stripe"]  # the payment lost in the outage
    assert "recovered 2," in runs["vapi"]  # the two lost call reports
    assert "recovered 1," in runs["twilio"]  # the SMS whose status callbacks were lost
    assert "FIRING  RechargeFailures{stripe}" in report  # Bolt's declined card
    assert (tmp_path / "balances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Call admission: a cut call, a refused call, a browser call ended on its control URL.
    assert "ended exceeded-max-duration after" in report
    assert "inbound call   refused, Vapi said to the caller" in report
    assert "end-call sent 1x (ended)" in report
    assert "10/10" in out
    # Among this process's children (the demo spawns its worker directly): another demo running
    # elsewhere on the machine is not a leftover of this one.
    leftovers = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "shim.cli worker --interval 0.5"], capture_output=True
    )
    assert leftovers.stdout == b""
