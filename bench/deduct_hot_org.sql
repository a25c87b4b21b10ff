-- api.deduct_call_credits on one hot org (:org, passed by run.py with -D): every client charges
-- the same wallet, so calls serialise on its row lock, like the bare_update.sql baseline.
\set r random(1, 9223372036854775806)
\set secs random(1, 600)
SELECT api.deduct_call_credits(('00000000-0000-4000-8000-' || :org)::uuid, 'bench-hot-' || :r, :secs);
