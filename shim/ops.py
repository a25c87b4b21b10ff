"""GET /healthz and GET /metrics, for operators and their scrapers."""

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
        applied = conn.execute(QUERIES["schema_current"], {"ids": EXPECTED_MIGRATIONS}).fetchone()["applied"]
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
