-- Notifications for the platform to deliver (low balance, recharge failures, the recharge spend
-- cap reached, suspension).

-- The oldest undelivered notifications, for the platform's mailer to send.
CREATE OR REPLACE FUNCTION api.pending_notifications(max_rows integer DEFAULT 100)
  RETURNS TABLE (id bigint, org_id uuid, kind text, details jsonb, created_at timestamptz)
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
AS $$
BEGIN
  IF max_rows IS NULL OR max_rows NOT BETWEEN 1 AND 1000 THEN
    PERFORM billing._invalid('max_rows', 'must be between 1 and 1000');
  END IF;
  RETURN QUERY
    SELECT n.id, n.org_id, n.kind, n.details, n.created_at FROM billing.notifications AS n
     WHERE n.delivered_at IS NULL ORDER BY n.id LIMIT max_rows;
END
$$;
GRANT EXECUTE ON FUNCTION api.pending_notifications(integer) TO service_role;

-- The platform says these were delivered; returns how many were newly marked.
CREATE OR REPLACE FUNCTION api.mark_notifications_delivered(ids bigint[])
  RETURNS integer
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
  WITH marked AS (
    UPDATE billing.notifications AS n SET delivered_at = now()
     WHERE n.id = ANY (ids) AND n.delivered_at IS NULL RETURNING 1)
  SELECT count(*)::integer FROM marked
$$;
GRANT EXECUTE ON FUNCTION api.mark_notifications_delivered(bigint[]) TO service_role;
