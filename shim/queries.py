"""The shim's SQL, parsed once from queries.sql: `QUERIES["ingest_webhook"]`."""

import re
from pathlib import Path

_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


QUERIES_FILE = Path(__file__).with_name("queries.sql")


def load(path: Path = QUERIES_FILE) -> dict[str, str]:
    """Split the file on its `-- name:` lines; comment lines inside a block are dropped."""
    text = path.read_text()
    parts = _NAME_LINE.split(text)[1:]
    queries = {}
    for name, block in zip(parts[::2], parts[1::2], strict=True):
        lines = [line for line in block.splitlines() if line.strip() and not line.startswith("--")]
        queries[name] = "\n".join(lines)
    return queries


QUERIES = load()
