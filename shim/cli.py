"""The `creditledger` command: migrate, serve, worker, reconcile, health, demo."""

import argparse
import json
import sys

from shim.database import database_url


def cmd_migrate(args) -> int:
    """Apply migrations, functions and policies to DATABASE_URL (or the embedded server)."""
    from shim.migrate import migrate

    print(json.dumps(migrate(database_url())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Subcommands, one per job the Makefile names."""
    parser = argparse.ArgumentParser(prog="creditledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help=cmd_migrate.__doc__).set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
