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

-- Wallets whose balance differs from the balance their newest entry left behind, or whose held
-- amount differs from their open holds. One index probe per wallet: cheap enough to scrape.
CREATE OR REPLACE FUNCTION billing._cheap_invariant_violations()
  RETURNS bigint
  LANGUAGE sql STABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT count(*) FROM billing.wallets AS w
   WHERE w.balance_minor <> coalesce((SELECT le.balance_after_minor FROM billing.ledger_entries AS le
                                       WHERE le.org_id = w.org_id ORDER BY le.id DESC LIMIT 1), 0)
      OR w.held_minor <> coalesce((SELECT sum(h.amount_minor) FROM billing.holds AS h
                                    WHERE h.org_id = w.org_id AND h.status = 'open'), 0)
$$;

-- Every billing health number, one row each, labelled by provider where it applies.
CREATE OR REPLACE FUNCTION api.health_metrics()
  RETURNS TABLE (metric text, provider text, value double precision)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  WITH providers(provider) AS (VALUES ('stripe'), ('vapi'), ('twilio')),
  windows(name, span) AS (VALUES ('1h', interval '1 hour'), ('24h', interval '24 hours')),
  -- The last 24 hours only, read through webhook_events_received_idx: the scrape costs what the
  -- day's traffic costs, not what the inbox's whole history would.
  recent AS (
    SELECT e.provider, e.status, e.received_at FROM billing.webhook_events AS e
     WHERE e.received_at > now() - interval '24 hours'),
  events AS (
    SELECT p.provider, wn.name AS win,
           count(e.received_at) AS received,
           count(e.received_at) FILTER (WHERE e.status IN ('processed', 'ignored')) AS applied,
           count(e.received_at) FILTER (WHERE e.status = 'failed') AS failed,
           count(e.received_at) FILTER (WHERE e.status = 'dead') AS dead,
           count(e.received_at) FILTER (WHERE e.status = 'unattributed') AS unattributed
      FROM providers AS p CROSS JOIN windows AS wn
      LEFT JOIN recent AS e ON e.provider = p.provider AND e.received_at > now() - wn.span
     GROUP BY p.provider, wn.name),
  -- Every event still needing attention, whatever its age (indexes: retry_idx, alert_idx).
  backlog AS (
    SELECT p.provider,
           count(e.id) FILTER (WHERE e.status = 'failed') AS n,
           coalesce(EXTRACT(EPOCH FROM now() - min(e.received_at) FILTER (WHERE e.status = 'failed')), 0) AS oldest,
           count(e.id) FILTER (WHERE e.status = 'dead') AS dead_letters,
           count(e.id) FILTER (WHERE e.status = 'unattributed') AS unattributed
      FROM providers AS p
      LEFT JOIN billing.webhook_events AS e
        ON e.provider = p.provider AND e.status IN ('failed', 'dead', 'unattributed')
     GROUP BY p.provider),
  reconciled AS (
    SELECT p.provider,
           EXTRACT(EPOCH FROM now() - max(r.finished_at)) AS age,
           (SELECT le.created_at FROM billing.ledger_entries AS le ORDER BY le.id LIMIT 1) AS ledger_since
      FROM (VALUES ('stripe'), ('vapi')) AS p(provider)
      LEFT JOIN billing.reconciliation_runs AS r ON r.provider = p.provider AND r.status = 'completed'
     GROUP BY p.provider)
  SELECT 'webhook_events_received_' || win, provider, received::double precision FROM events
  UNION ALL SELECT 'webhook_events_applied_' || win, provider, applied FROM events
  UNION ALL SELECT 'webhook_events_failed_' || win, provider, failed FROM events
  UNION ALL SELECT 'webhook_events_dead_' || win, provider, dead FROM events
  UNION ALL SELECT 'webhook_success_ratio_' || win, provider,
                   CASE WHEN received = 0 THEN 1 ELSE applied::double precision / received END FROM events
  UNION ALL SELECT 'webhook_backlog', provider, n FROM backlog
  UNION ALL SELECT 'webhook_backlog_oldest_seconds', provider, oldest FROM backlog
  UNION ALL SELECT 'webhook_dead_letters', provider, dead_letters FROM backlog
  UNION ALL SELECT 'webhook_unattributed', provider, unattributed FROM backlog
  -- Seconds since the last completed reconciliation; -1 when none ran and none is owed yet.
  UNION ALL SELECT 'reconciliation_age_seconds', provider,
                   coalesce(age, CASE WHEN ledger_since < now() - interval '26 hours'
                                      THEN EXTRACT(EPOCH FROM now() - ledger_since) ELSE -1 END)
              FROM reconciled
  UNION ALL SELECT 'open_discrepancies', p.provider, count(d.id) FROM providers AS p
              LEFT JOIN billing.discrepancies AS d ON d.provider = p.provider AND d.status = 'open'
             GROUP BY p.provider
  UNION ALL SELECT 'recharge_failures_24h', 'stripe', count(*) FROM billing.recharge_claims AS c
             WHERE c.status = 'failed' AND c.settled_at > now() - interval '24 hours'
               AND c.failure_code IS DISTINCT FROM 'canceled_by_customer'
  -- Claims not yet accepted by Stripe (a stuck worker or a Stripe outage) ...
  UNION ALL SELECT 'recharge_pending', 'stripe', count(*) FROM billing.recharge_claims AS c
             WHERE c.status = 'pending' AND c.payment_intent_id IS NULL
  -- ... and how long the oldest of those has waited: a claim normally lives seconds, so half an
  -- hour means nobody is charging (RechargeClaimsStuck). 0 when there is none.
  UNION ALL SELECT 'recharge_pending_oldest_seconds', 'stripe',
                   coalesce(EXTRACT(EPOCH FROM now() - min(c.created_at)), 0)
              FROM billing.recharge_claims AS c
             WHERE c.status = 'pending' AND c.payment_intent_id IS NULL
  -- ... apart from those Stripe accepted and is still processing (a bank debit: days, normal).
  UNION ALL SELECT 'recharge_processing', 'stripe', count(*) FROM billing.recharge_claims AS c
             WHERE c.status = 'pending' AND c.payment_intent_id IS NOT NULL
  UNION ALL SELECT 'auto_recharge_disabled', NULL, count(*) FROM billing.wallets AS w
             WHERE w.auto_recharge_disabled_reason IS NOT NULL AND NOT w.auto_recharge_enabled
  -- Wallets whose 24-hour auto-recharge cap refused a claim in the last 24 hours (customers are
  -- notified; their calls are authorised against what is left until the window moves on).
  UNION ALL SELECT 'auto_recharge_capped', NULL, count(*) FROM billing.wallets AS w
             WHERE w.auto_recharge_enabled AND w.auto_recharge_capped_at > now() - interval '24 hours'
  UNION ALL SELECT 'wallets_suspended', NULL, count(*) FROM billing.wallets AS w WHERE w.status = 'suspended'
  UNION ALL SELECT 'wallets_below_low_balance', NULL, count(*) FROM billing.wallets AS w WHERE w.below_low_balance
  UNION ALL SELECT 'holds_open', NULL, count(*) FROM billing.holds AS h WHERE h.status = 'open'
  UNION ALL SELECT 'notifications_undelivered', NULL, count(*) FROM billing.notifications AS n
             WHERE n.delivered_at IS NULL
  UNION ALL SELECT 'ledger_invariant_violations', NULL, billing._cheap_invariant_violations()
$$;
GRANT EXECUTE ON FUNCTION api.health_metrics() TO service_role;

-- The same numbers, as operators read them.
CREATE OR REPLACE VIEW billing.health AS SELECT * FROM api.health_metrics();

-- The alerts of docs/monitoring.md evaluated on a set of metric rows (the Prometheus rules in
-- ops/prometheus/alerts.yml say the same over time).
CREATE OR REPLACE FUNCTION billing._evaluate_alerts(p_metrics jsonb)
  RETURNS TABLE (alert text, provider text, value double precision, threshold double precision, firing boolean)
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  WITH m AS (SELECT * FROM pg_catalog.jsonb_to_recordset(p_metrics)
                        AS x(metric text, provider text, value double precision)),
  rules(alert, metric, threshold, fires_above) AS (VALUES
    ('WebhookSuccessRateLow', 'webhook_success_ratio_1h', 0.95, false),
    ('WebhookBacklogStale', 'webhook_backlog_oldest_seconds', 300, true),
    ('WebhookDeadLetters', 'webhook_dead_letters', 0, true),
    ('WebhookUnattributed', 'webhook_unattributed', 0, true),
    ('LedgerInvariantViolated', 'ledger_invariant_violations', 0, true),
    ('ReconciliationStale', 'reconciliation_age_seconds', 26 * 3600, true),
    ('DiscrepanciesOpen', 'open_discrepancies', 0, true),
    ('RechargeFailures', 'recharge_failures_24h', 0, true),
    ('RechargeClaimsStuck', 'recharge_pending_oldest_seconds', 1800, true),
    ('AutoRechargeDisabled', 'auto_recharge_disabled', 0, true),
    ('AutoRechargeCapped', 'auto_recharge_capped', 0, true))
  SELECT r.alert, m.provider, m.value, r.threshold::double precision,
         CASE WHEN r.fires_above THEN m.value > r.threshold ELSE m.value < r.threshold END
    FROM rules AS r JOIN m ON m.metric = r.metric
   ORDER BY 1, 2
$$;

-- The alerts, evaluated now.
CREATE OR REPLACE FUNCTION api.health_alerts()
  RETURNS TABLE (alert text, provider text, value double precision, threshold double precision, firing boolean)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  SELECT * FROM billing._evaluate_alerts((SELECT pg_catalog.jsonb_agg(m) FROM api.health_metrics() AS m))
$$;
GRANT EXECUTE ON FUNCTION api.health_alerts() TO service_role;

-- Metrics and alerts from one evaluation of the metrics: what a scrape and `creditledger health` read.
CREATE OR REPLACE FUNCTION api.health_report()
  RETURNS jsonb
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  WITH m AS (SELECT pg_catalog.jsonb_agg(x) AS rows FROM api.health_metrics() AS x)
  SELECT pg_catalog.jsonb_build_object(
    'metrics', m.rows,
    'alerts', (SELECT pg_catalog.jsonb_agg(a) FROM billing._evaluate_alerts(m.rows) AS a))
    FROM m
$$;
GRANT EXECUTE ON FUNCTION api.health_report() TO service_role;
