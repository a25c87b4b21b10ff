-- yoyo's bookkeeping (_yoyo_migration, _yoyo_log, _yoyo_version, yoyo_lock) lives in
-- creditledger_migrations, a schema no API role can enter: in public, where yoyo puts it by
-- default, Supabase's default privileges give anon and authenticated ALL on it, and PostgREST
-- exposes public, so anyone with the anon key could erase the history (/healthz then answers 503)
-- or hold yoyo_lock. shim/migrate.py points yoyo at this schema; this file creates it and moves
-- the tables an earlier release left in public, before yoyo connects. Idempotent: once moved,
-- there is nothing left in public to move.

CREATE SCHEMA IF NOT EXISTS creditledger_migrations;
COMMENT ON SCHEMA creditledger_migrations IS
  'yoyo''s migration history and lock: the migration owner''s only, exposed by no API';

DO $$
DECLARE
  t text;
  locked_by integer;
BEGIN
  -- A row in an old yoyo_lock means a migrate of an earlier release is running (or died
  -- holding it): moving the table under it would hide its lock from it.
  IF pg_catalog.to_regclass('public.yoyo_lock') IS NOT NULL THEN
    EXECUTE 'SELECT pid FROM public.yoyo_lock LIMIT 1' INTO locked_by;
    IF locked_by IS NOT NULL THEN
      RAISE EXCEPTION USING
        ERRCODE = '55P03',
        MESSAGE = pg_catalog.format('public.yoyo_lock is held by process %s', locked_by),
        DETAIL = 'A migrate of an earlier release holds yoyo''s lock in public.',
        HINT = 'Let it finish (or, if it died, DELETE FROM public.yoyo_lock), then migrate again.';
    END IF;
  END IF;

  FOREACH t IN ARRAY ARRAY['_yoyo_migration', '_yoyo_log', '_yoyo_version', 'yoyo_lock'] LOOP
    CONTINUE WHEN pg_catalog.to_regclass(pg_catalog.format('public.%I', t)) IS NULL;
    IF pg_catalog.to_regclass(pg_catalog.format('creditledger_migrations.%I', t)) IS NULL THEN
      -- Moved with its rows, indexes and owner: no history is copied, so none can be lost.
      EXECUTE pg_catalog.format('ALTER TABLE public.%I SET SCHEMA creditledger_migrations', t);
    ELSE
      -- Both exist: an earlier release's migrate ran after the move and began a history of its
      -- own in public. Keep every row the moved table lacks (yoyo's tables all have a primary
      -- key), then drop the copy.
      EXECUTE pg_catalog.format(
        'INSERT INTO creditledger_migrations.%1$I SELECT * FROM public.%1$I ON CONFLICT DO NOTHING', t);
      EXECUTE pg_catalog.format('DROP TABLE public.%I', t);
    END IF;
    -- The grants public's default privileges gave it do not belong here (the schema already
    -- keeps every API role out; db/policies/20_migration_bookkeeping.sql keeps the owner alone).
    EXECUTE pg_catalog.format(
      'REVOKE ALL ON creditledger_migrations.%I FROM PUBLIC, anon, authenticated, service_role', t);
  END LOOP;
END
$$;
