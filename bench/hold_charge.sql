-- A call's life on one org with many calls in flight: authorize_call places the hold when the
-- call starts, deduct_call_credits charges it and captures the hold when it ends. Two separate
-- transactions (two webhooks in production); pgbench counts one script run, i.e. one call.
\set r random(1, 9223372036854775806)
\set secs random(1, 300)
SELECT api.authorize_call(('00000000-0000-4000-8000-' || :org)::uuid, 'bench-held-' || :r);
SELECT api.deduct_call_credits(('00000000-0000-4000-8000-' || :org)::uuid, 'bench-held-' || :r, :secs);
