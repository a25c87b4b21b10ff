-- Baseline for one hot wallet: a bare single-row UPDATE in autocommit. Every client updates the
-- same row, so commits queue on its row lock: one lock per commit, the physical limit for one org.
UPDATE bench_hot_row SET n = n + 1 WHERE id = 1;
