"""The end of the day: per-org ledger and balances, what reconciliation recovered, the health
summary, and a PNG chart of each org's balance through the day."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render straight to a file
import matplotlib.pyplot as plt  # noqa: E402


def money(minor: int) -> str:
    return f"{'-' if minor < 0 else ''}${abs(minor) / 100:,.2f}"


def ledger_summary(db, orgs) -> list[str]:
    lines = []
    for org in orgs:
        wallet = db.execute("SELECT * FROM billing.wallets WHERE org_id = %s", (org.org_id,)).fetchone()
        rows = db.execute(
            "SELECT kind, count(*) AS n, sum(amount_minor) AS total FROM billing.ledger_entries "
            "WHERE org_id = %s GROUP BY kind ORDER BY kind",
            (org.org_id,),
        ).fetchall()
        lines.append(f"{org.name} ({org.org_id})")
        for row in rows:
            lines.append(f"  {row['kind']:<18} {row['n']:>4} entries  {money(row['total']):>12}")
        lines.append(
            f"  {'balance':<18} {'':>12}  {money(wallet['balance_minor']):>12}   "
            f"held {money(wallet['held_minor'])}, status {wallet['status']}, "
            f"auto-recharge {'on' if wallet['auto_recharge_enabled'] else 'off'}"
        )
    return lines


def recovery_summary(recovered: dict) -> list[str]:
    return [
        f"  {provider:<7} run #{run['id']}: seen {run['seen']}, already applied {run['already_applied']}, "
        f"recovered {run['recovered']}, discrepancies {run['discrepancies']}"
        for provider, run in recovered.items()
    ]


def balance_chart(db, orgs, path: Path) -> None:
    """Balance after every ledger entry, per org, in the order the day recorded them."""
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for org in orgs:
        rows = db.execute(
            "SELECT id, balance_after_minor FROM billing.ledger_entries WHERE org_id = %s ORDER BY id",
            (org.org_id,),
        ).fetchall()
        ax.step(
            [r["id"] for r in rows],
            [r["balance_after_minor"] / 100 for r in rows],
            where="post",
            label=org.name,
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("ledger entry (the day, in order)")
    ax.set_ylabel("balance (USD)")
    ax.set_title("Wallet balances through the demo day")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
