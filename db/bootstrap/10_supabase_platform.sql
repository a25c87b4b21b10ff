-- Plain PostgreSQL (tests, the demo's embedded server) made to look like a Supabase project: the
-- roles PostgREST switches between and the privileges Supabase grants on its own, so that every
-- test runs against what a hosted project would do to our objects. Applied by `make migrate`
-- before yoyo creates its tables (a yoyo migration would run too late to affect them), on every
-- run, in one transaction with the other db/bootstrap files.
--
-- Written from supabase/postgres (migrations/db/init-scripts/00000000000000-initial-schema.sql,
-- run as `postgres`, and migrations/db/migrations/*: 20220317095840_pg_graphql,
-- 20221103090837_revoke_admin, 20230201083204_grant_auth_roles_to_postgres,
-- 20230529180330_alter_api_roles_for_inherit) and Supabase's "Data API" and "Using custom
-- schemas" guides. It reproduces a project with "Default privileges for new entities" on (every
-- project had it until Supabase switched it off for new projects on 2026-05-30 and existing ones
-- on 2026-10-30; a project may switch it back on) and the supabase_admin defaults in public that
-- no project can switch off: our objects must be safe under the most open a project can be.
--
-- On a real Supabase project this file does nothing: the platform's supabase_admin exists and is
-- not ours. We recognise our own stand-in by its comment (roles are per cluster, so a second
-- database on the same server sees the roles the first one created; default privileges are per
-- database, so each database still gets its own).

DO $$
DECLARE
  emulation constant text := 'creditledger: stand-in for Supabase''s supabase_admin (no login)';
  marker text;
  owner_role text;
  kind text;
  grantees text;
BEGIN
  SELECT pg_catalog.shobj_description(r.oid, 'pg_authid') INTO marker
    FROM pg_catalog.pg_roles AS r WHERE r.rolname = 'supabase_admin';
  IF FOUND AND marker IS DISTINCT FROM emulation THEN
    RETURN;  -- a real Supabase project: its roles and defaults are the platform's, not ours
  END IF;

  -- Roles, with today's attributes (the API roles became INHERIT in 20230529180330). A
  -- concurrent migrate of another database on this server may create one first: that is fine.
  -- supabase_admin owns the platform's objects there (a superuser); here it never logs in and
  -- only carries the default privileges Supabase gives it in public.
  BEGIN
    CREATE ROLE supabase_admin NOLOGIN;
  EXCEPTION WHEN duplicate_object THEN NULL;
  END;
  EXECUTE pg_catalog.format('COMMENT ON ROLE supabase_admin IS %L', emulation);
  BEGIN
    CREATE ROLE anon NOLOGIN;
  EXCEPTION WHEN duplicate_object THEN NULL;
  END;
  BEGIN
    CREATE ROLE authenticated NOLOGIN;
  EXCEPTION WHEN duplicate_object THEN NULL;
  END;
  BEGIN
    CREATE ROLE service_role NOLOGIN BYPASSRLS;
  EXCEPTION WHEN duplicate_object THEN NULL;
  END;
  -- PostgREST logs in as authenticator and SET ROLEs to the JWT's role: NOINHERIT, so it holds
  -- none of their privileges until it switches. No password: where the server asks for one,
  -- nobody can log in as it (the embedded server trusts its private socket, as it does for the
  -- superuser).
  BEGIN
    CREATE ROLE authenticator LOGIN NOINHERIT;
  EXCEPTION WHEN duplicate_object THEN NULL;
  END;
  -- 0001 created the API roles NOINHERIT before this file existed: bring them to Supabase's.
  ALTER ROLE anon INHERIT;
  ALTER ROLE authenticated INHERIT;
  ALTER ROLE service_role INHERIT;
  GRANT anon, authenticated, service_role TO authenticator;
  -- supabase_admin was granted to authenticator at first and revoked in 20221103090837.
  IF pg_catalog.pg_has_role('authenticator', 'supabase_admin', 'MEMBER') THEN
    REVOKE supabase_admin FROM authenticator;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'postgres') THEN
    GRANT anon, authenticated, service_role TO postgres;
  END IF;

  -- Schemas every project has, as Supabase grants them. PostgREST exposes public and
  -- graphql_public by default (and api, which we add); extensions is on every API role's path.
  CREATE SCHEMA IF NOT EXISTS extensions;
  CREATE SCHEMA IF NOT EXISTS graphql_public;
  GRANT USAGE ON SCHEMA public, extensions, graphql_public TO anon, authenticated, service_role;

  -- Default privileges: ALL on every table, sequence and function to postgres and the API
  -- roles, in public for objects created by postgres (the init script runs as postgres, so its
  -- unqualified ALTER DEFAULT PRIVILEGES are postgres's) or by supabase_admin, and in
  -- graphql_public for supabase_admin's (the pg_graphql migration runs as supabase_admin). The
  -- role that runs `make migrate` plays postgres's part, whatever this server calls it: on
  -- Supabase it is postgres. Changing another role's defaults needs a superuser here (as there).
  grantees := 'anon, authenticated, service_role';
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'postgres') THEN
    grantees := 'postgres, ' || grantees;
  END IF;
  FOR owner_role IN
    SELECT DISTINCT r.rolname FROM pg_catalog.pg_roles AS r
     WHERE r.rolname IN ('postgres', 'supabase_admin', current_user)
       AND (r.rolname = current_user
            OR (SELECT s.rolsuper FROM pg_catalog.pg_roles AS s WHERE s.rolname = current_user))
  LOOP
    FOREACH kind IN ARRAY ARRAY['TABLES', 'SEQUENCES', 'FUNCTIONS'] LOOP
      EXECUTE pg_catalog.format(
        'ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %s GRANT ALL ON %s TO %s',
        owner_role,
        CASE WHEN owner_role = 'supabase_admin' THEN 'public, graphql_public' ELSE 'public' END,
        kind, grantees);
    END LOOP;
  END LOOP;
  -- Any other schema (api, billing, auth, ours) gets no Supabase defaults, only PostgreSQL's own:
  -- EXECUTE on new functions and USAGE on new types to PUBLIC, which anon is part of. That is
  -- why db/policies revokes EXECUTE from PUBLIC in the schemas we create.
END
$$;
