-- Who may reach what. Re-applied on every migrate, so it is written to be idempotent.

-- Nothing is executable by PUBLIC (anon included); grants sit next to each function.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA billing FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON SCHEMA billing FROM PUBLIC, anon;
REVOKE ALL ON SCHEMA api FROM PUBLIC, anon;

-- The exposed schema: callers see the functions granted to them, and the types they return.
GRANT USAGE ON SCHEMA api TO authenticated, service_role;

-- The read-only client functions run with the caller's rights (SECURITY INVOKER) so that RLS,
-- not the function body, is what keeps org A out of org B's rows. The two that write
-- (begin_checkout, configure_auto_recharge) are SECURITY DEFINER and guard in their bodies; the
-- README's "Why two client functions are SECURITY DEFINER" says why no write privilege is
-- granted here instead.
GRANT USAGE ON SCHEMA billing TO authenticated;
GRANT SELECT ON billing.wallets, billing.ledger_entries TO authenticated;
GRANT EXECUTE ON FUNCTION billing._caller_org_id() TO authenticated;
GRANT EXECUTE ON FUNCTION billing._wallet_row(billing.wallets) TO authenticated;
GRANT EXECUTE ON FUNCTION billing._invalid(text, text) TO authenticated;
