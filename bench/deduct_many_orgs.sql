-- api.deduct_call_credits over many wallets: a random seeded org (n = 1..:orgs), a unique call id
-- (63 random bits), a duration of up to 10 minutes. One transaction per call (autocommit).
-- Org n's uuid is '00000000-0000-4000-8000-' || (100000000000 + n) (see bench/harness.py).
\set org 100000000000 + random(1, :orgs)
\set r random(1, 9223372036854775806)
\set secs random(1, 600)
SELECT api.deduct_call_credits(('00000000-0000-4000-8000-' || :org)::uuid, 'bench-call-' || :r, :secs);
