-- The schema's state for /healthz, read from yoyo's bookkeeping, which only the migration owner
-- may read (db/bootstrap/20_migration_bookkeeping.sql): this function is how the shim reads it.

-- How many of the given migrations (yoyo ids: file names without .sql) are applied.
CREATE OR REPLACE FUNCTION api.schema_migrations_applied(p_migration_ids text[])
  RETURNS bigint
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  SELECT count(*) FROM creditledger_migrations._yoyo_migration AS m
   WHERE m.migration_id = ANY (p_migration_ids)
$$;
GRANT EXECUTE ON FUNCTION api.schema_migrations_applied(text[]) TO service_role;
