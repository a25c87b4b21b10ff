"""The `creditledger` command: migrate, serve, worker, reconcile, health, demo."""

import argparse
import json
import logging
import os
import sys
import tempfile

from shim.database import database_url


def cmd_migrate(args) -> int:
    """Apply migrations, functions and policies to DATABASE_URL (or the embedded server)."""
    from shim.migrate import migrate

    print(json.dumps(migrate(database_url())))
    return 0


def gunicorn_argv(
    port: int,
    workers: int = 2,
    threads: int = 8,
    host: str = "0.0.0.0",
    app: str = "shim.app:create_app()",
    access_log: str = "-",
) -> list[str]:
    """The production server command: gunicorn, threaded workers (requests mostly wait on the
    database), bodies capped by the app itself. Tests, the demo and the bench bind 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        app,
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--access-logfile",
        access_log,
        "--graceful-timeout",
        "20",
    ]


def cmd_serve(args) -> int:
    """Serve the shim under gunicorn on PORT (default 8080)."""
    from shim.config import Config

    os.environ.setdefault("DATABASE_URL", database_url())
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One metrics directory shared by the workers (see shim/metrics.py), fresh per start.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="creditledger-metrics-")
    argv = gunicorn_argv(args.port or Config().port, args.workers, args.threads)
    os.execvp(argv[0], argv)
    return 0  # not reached: exec replaces this process


def cmd_worker(args) -> int:
    """Retry failed webhooks, expire holds, charge auto-recharges (and reconcile, when due)."""
    from shim.config import Config
    from shim.pool import open_pool
    from shim.worker import run_forever, run_once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = Config()
    with open_pool(config.database_url) as pool:
        if args.once:
            print(json.dumps(run_once(pool, config), default=str))
        else:
            run_forever(pool, config, args.interval)
    return 0


def cmd_reconcile(args) -> int:
    """Reconcile the ledger with Stripe, Vapi or Twilio over --since (e.g. 7d, 24h)."""
    from shim.config import Config
    from shim.pool import open_pool
    from shim.reconcile import parse_since
    from shim.worker import reconcile_provider

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = Config()
    with open_pool(config.database_url) as pool:
        since = parse_since(args.since) if args.since else None
        run = reconcile_provider(pool, config, args.provider, since, resume=args.resume)
    print(json.dumps(run, indent=2, default=str))
    return 0 if run.get("status") == "completed" else 1


def cmd_health(args) -> int:
    """Print the billing health report; exit 1 when any alert fires, 2 when the database is down."""
    from shim.config import Config
    from shim.health import report
    from shim.pool import open_pool

    try:
        with open_pool(Config().database_url) as pool:
            text, firing = report(pool)
    except Exception as exc:
        print(f"billing database unreachable: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 1 if firing else 0


def cmd_demo(args) -> int:
    """A scripted day of billing on the real stack (embedded PostgreSQL unless DATABASE_URL)."""
    from pathlib import Path

    from shim.demo.run import run

    return run(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    """Subcommands, one per job the Makefile names."""
    parser = argparse.ArgumentParser(prog="creditledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help=cmd_migrate.__doc__).set_defaults(func=cmd_migrate)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=8)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help=cmd_worker.__doc__)
    worker.add_argument("--once", action="store_true", help="one pass of everything due, then exit")
    worker.add_argument("--interval", type=float, default=5.0, help="seconds between passes")
    worker.set_defaults(func=cmd_worker)
    reconcile = sub.add_parser("reconcile", help=cmd_reconcile.__doc__)
    reconcile.add_argument("provider", choices=["stripe", "vapi", "twilio"])
    reconcile.add_argument(
        "--since", default=None, help="how far back: 7d, 24h, 90m (default: stripe 7d, vapi 24h, twilio 7d)"
    )
    reconcile.add_argument(
        "--resume", action="store_true", help="continue the latest failed run over its own window"
    )
    reconcile.set_defaults(func=cmd_reconcile)
    sub.add_parser("health", help=cmd_health.__doc__).set_defaults(func=cmd_health)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out", default="demo-output", help="where the report and chart are written")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
