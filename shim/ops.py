"""GET /healthz and GET /metrics, for operators and their scrapers."""

import psycopg
from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shim.metrics_auth import require_metrics_token
from shim.migrate import sql_files
from shim.queries import QUERIES

bp = Blueprint("ops", __name__)

# The migrations this release expects: healthz is 200 only when all are applied.
EXPECTED_MIGRATIONS = [path.stem for path in sql_files("migrations")]


@bp.get("/healthz")
def healthz():
    """200 when the database answers and every migration of this release is applied."""
    pool = current_app.extensions["creditledger.pool"]
    with pool.connection() as conn:
        try:
            # yoyo's history is readable by the migration owner only; this SECURITY DEFINER
            # function (service_role only) is the shim's one window on it.
            row = conn.execute(QUERIES["schema_current"], {"ids": EXPECTED_MIGRATIONS}).fetchone()
            applied = row["applied"]
        except psycopg.errors.UndefinedFunction:
            # A database this release's `make migrate` has not reached: its functions are
            # missing too, so nothing can be counted. Pending, not broken.
            applied = None
    current = applied == len(EXPECTED_MIGRATIONS)
    body = {"database": "ok", "migrations_applied": applied, "migrations_expected": len(EXPECTED_MIGRATIONS)}
    return jsonify(body | {"status": "ok" if current else "migrations_pending"}), 200 if current else 503


@bp.get("/metrics")
def metrics():
    """Prometheus exposition of the shim's and the billing database's metrics, for the holder
    of METRICS_TOKEN only."""
    require_metrics_token(
        current_app.config["CREDITLEDGER"].metrics_token, request.headers.get("Authorization")
    )
    registry = current_app.extensions["creditledger.registry"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
