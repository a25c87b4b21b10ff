-- Ledger invariants: the checks tests run after every test and the health report runs on a timer.

-- Wallets whose balance is not the sum of their ledger, or whose held amount is not the sum of
-- their open holds. Exhaustive (it reads every entry): for tests, audits and nightly checks.
CREATE OR REPLACE FUNCTION api.ledger_invariant_violations()
  RETURNS TABLE (org_id uuid, problem text, recorded_minor bigint, expected_minor bigint)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  SELECT w.org_id, 'balance_not_sum_of_entries', w.balance_minor, coalesce(e.total, 0)
    FROM billing.wallets AS w
    LEFT JOIN (SELECT le.org_id, sum(le.amount_minor)::bigint AS total
                 FROM billing.ledger_entries AS le GROUP BY le.org_id) AS e ON e.org_id = w.org_id
   WHERE w.balance_minor <> coalesce(e.total, 0)
  UNION ALL
  SELECT w.org_id, 'held_not_sum_of_open_holds', w.held_minor, coalesce(h.total, 0)
    FROM billing.wallets AS w
    LEFT JOIN (SELECT ho.org_id, sum(ho.amount_minor)::bigint AS total
                 FROM billing.holds AS ho WHERE ho.status = 'open' GROUP BY ho.org_id) AS h
      ON h.org_id = w.org_id
   WHERE w.held_minor <> coalesce(h.total, 0)
  UNION ALL
  -- Each entry's balance_after must continue the previous entry's chain.
  SELECT x.org_id, 'broken_balance_chain', x.balance_after_minor, x.expected
    FROM (SELECT le.org_id, le.balance_after_minor,
                 sum(le.amount_minor) OVER (PARTITION BY le.org_id ORDER BY le.id)::bigint AS expected
            FROM billing.ledger_entries AS le) AS x
   WHERE x.balance_after_minor <> x.expected
$$;
GRANT EXECUTE ON FUNCTION api.ledger_invariant_violations() TO service_role;
