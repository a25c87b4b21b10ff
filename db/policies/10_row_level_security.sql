-- Row Level Security on every billing table, enabled and forced (the owner too is subject to it).

DO $$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT c.relname FROM pg_catalog.pg_class AS c
             JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = 'billing' AND c.relkind IN ('r', 'p') LOOP
    EXECUTE pg_catalog.format('ALTER TABLE billing.%I ENABLE ROW LEVEL SECURITY', t.relname);
    EXECUTE pg_catalog.format('ALTER TABLE billing.%I FORCE ROW LEVEL SECURITY', t.relname);
    -- The schema owner is the identity of SECURITY DEFINER functions: it sees every row.
    EXECUTE pg_catalog.format('DROP POLICY IF EXISTS definer_all ON billing.%I', t.relname);
    EXECUTE pg_catalog.format(
      'CREATE POLICY definer_all ON billing.%I FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true)',
      t.relname);
  END LOOP;
END
$$;

-- A signed-in user reads its own org's wallet and ledger, nothing else, and writes nothing.
DROP POLICY IF EXISTS member_reads_own_wallet ON billing.wallets;
CREATE POLICY member_reads_own_wallet ON billing.wallets
  FOR SELECT TO authenticated
  USING (org_id = (SELECT billing._caller_org_id()));

DROP POLICY IF EXISTS member_reads_own_ledger ON billing.ledger_entries;
CREATE POLICY member_reads_own_ledger ON billing.ledger_entries
  FOR SELECT TO authenticated
  USING (org_id = (SELECT billing._caller_org_id()));
