-- yoyo's bookkeeping is the migration owner's alone: no role but the owner of
-- creditledger_migrations (and of each table in it) holds any privilege there, PUBLIC included.
-- Re-applied on every migrate, after yoyo, so it also covers whatever yoyo creates later.

DO $$
DECLARE
  grant_row record;
BEGIN
  FOR grant_row IN
    SELECT 'SCHEMA creditledger_migrations' AS target, a.grantee
      FROM pg_catalog.pg_namespace AS n
     CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) AS a
     WHERE n.nspname = 'creditledger_migrations' AND a.grantee <> n.nspowner
    UNION
    SELECT pg_catalog.format('TABLE %s', c.oid::regclass), a.grantee
      FROM pg_catalog.pg_class AS c
      JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
     CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) AS a
     WHERE n.nspname = 'creditledger_migrations' AND a.grantee <> c.relowner
  LOOP
    EXECUTE pg_catalog.format(
      'REVOKE ALL ON %s FROM %s', grant_row.target,
      CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC'
           ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(grant_row.grantee)) END);
  END LOOP;
END
$$;
