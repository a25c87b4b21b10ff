"""`make bench`: pgbench rows for the money functions, each as a ratio to a baseline (run.py)."""
