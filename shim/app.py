"""The Flask app factory: `gunicorn 'shim.app:create_app()'`."""

from flask import Flask
from prometheus_client import CollectorRegistry

from shim import calls, http_errors, metrics, ops, topups, webhooks
from shim.config import Config
from shim.health import BillingHealthCollector
from shim.pool import open_pool

# Providers send small JSON or forms; anything larger is refused with 413 before it is read.
MAX_BODY_BYTES = 1024 * 1024


def create_app(config: Config | None = None, pool=None) -> Flask:
    """Build the app. The pool opens lazily, so the app boots while the database is down."""
    config = config or Config()
    app = Flask("creditledger")
    app.config["CREDITLEDGER"] = config
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    if pool is None:
        pool = open_pool(config.database_url, max_size=config.pool_max_size)
        pool.open(wait=False)
    app.extensions["creditledger.pool"] = pool
    registry = CollectorRegistry()
    registry.register(BillingHealthCollector(pool))
    app.extensions["creditledger.registry"] = registry

    http_errors.register(app)
    metrics.install(app, registry)
    for blueprint in (webhooks.bp, topups.bp, calls.bp, ops.bp):
        app.register_blueprint(blueprint)
    return app
