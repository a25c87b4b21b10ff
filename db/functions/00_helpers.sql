-- Private helpers shared by every area: input validation, the caller's identity, fingerprints.

-- Grants are declarative: every migrate first takes them all away, then each file grants what
-- stands next to its functions (all in one transaction), so a grant deleted from the source is
-- gone from the database too.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA api, billing FROM PUBLIC, anon, authenticated, service_role;

-- Raise SQLSTATE 22023 naming the bad field (in the message and in the error's COLUMN field,
-- which clients read as diag.column_name). PostgREST answers 400 for it.
-- VOLATILE, not IMMUTABLE: a function that raises must never be pre-evaluated by the planner.
CREATE OR REPLACE FUNCTION billing._invalid(p_field text, p_problem text)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RAISE EXCEPTION USING
    ERRCODE = '22023',
    MESSAGE = pg_catalog.format('invalid %s: %s', p_field, p_problem),
    COLUMN = p_field,
    HINT = 'See the function''s contract in README.md, "The money functions".';
END
$$;

-- A key or id: present and at most 255 characters.
CREATE OR REPLACE FUNCTION billing._check_key(p_field text, p_value text)
  RETURNS void
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  IF p_value IS NULL OR p_value = '' THEN
    PERFORM billing._invalid(p_field, 'must not be null or empty');
  ELSIF pg_catalog.length(p_value) > 255 THEN
    PERFORM billing._invalid(p_field, 'must be at most 255 characters');
  END IF;
END
$$;

-- A money amount: positive and far from bigint overflow (10^15 minor units).
CREATE OR REPLACE FUNCTION billing._check_amount(p_field text, p_value bigint)
  RETURNS void
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  IF p_value IS NULL OR p_value <= 0 THEN
    PERFORM billing._invalid(p_field, 'must be a positive number of minor units');
  ELSIF p_value > 1000000000000000 THEN
    PERFORM billing._invalid(p_field, 'exceeds 10^15 minor units');
  END IF;
END
$$;

-- The org of the calling user, from the Supabase JWT's app_metadata (null when absent).
CREATE OR REPLACE FUNCTION billing._caller_org_id()
  RETURNS uuid
  LANGUAGE sql STABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT nullif(auth.jwt() -> 'app_metadata' ->> 'org_id', '')::uuid
$$;

-- The org of the caller, or 42501 when the JWT carries none: a client function needs one.
CREATE OR REPLACE FUNCTION billing._require_caller_org()
  RETURNS uuid
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_org uuid := billing._caller_org_id();
BEGIN
  IF v_org IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'no organisation in the caller''s JWT',
      HINT = 'Set app_metadata.org_id on the user.';
  END IF;
  RETURN v_org;
END
$$;

-- The caller's role in its org (owner, admin, member), from app_metadata.org_role.
CREATE OR REPLACE FUNCTION billing._caller_org_role()
  RETURNS text
  LANGUAGE sql STABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT auth.jwt() -> 'app_metadata' ->> 'org_role'
$$;

-- A stable digest of what a request asked for, to tell a retry from a different request.
-- (The helpers on the hot path are PL/pgSQL, which caches plans; see billing._lock_wallet.)
CREATE OR REPLACE FUNCTION billing._fingerprint(p_request jsonb)
  RETURNS text
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN pg_catalog.md5(p_request::text);
END
$$;

-- The operator's settings row.
CREATE OR REPLACE FUNCTION billing._settings()
  RETURNS billing.settings
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  s billing.settings;
BEGIN
  SELECT * INTO s FROM billing.settings;
  RETURN s;
END
$$;

-- The api.op_result for a request that changed nothing, with the wallet's current balance.
CREATE OR REPLACE FUNCTION billing._result(
  p_status text, p_org_id uuid, p_reason text,
  p_entry_id bigint DEFAULT NULL, p_amount_minor bigint DEFAULT NULL)
  RETURNS api.op_result
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN ROW(p_status, p_entry_id, p_amount_minor,
             (SELECT w.balance_minor FROM billing.wallets AS w WHERE w.org_id = p_org_id),
             p_reason)::api.op_result;
END
$$;
