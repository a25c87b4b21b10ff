"""First proof that the core money functions answer as the contract says."""

from tests.db_helpers import open_wallet, wallet


def test_credit_then_call_charge(service, db):
    org = open_wallet(service, balance_minor=1000)
    r = service.execute("SELECT * FROM api.authorize_call(%s, 'call-1', 2)", (org,)).fetchone()
    assert r["status"] == "applied" and r["amount_minor"] == 140
    assert wallet(db, org)["held_minor"] == 140
    r = service.execute("SELECT * FROM api.deduct_call_credits(%s, 'call-1', 61)", (org,)).fetchone()
    assert r["status"] == "applied"
    assert r["amount_minor"] == -72  # ceil(61 * 70 / 60)
    assert r["balance_minor"] == 928
    assert wallet(db, org)["held_minor"] == 0
    again = service.execute("SELECT * FROM api.deduct_call_credits(%s, 'call-1', 61)", (org,)).fetchone()
    assert again["status"] == "duplicate" and again["entry_id"] == r["entry_id"]
