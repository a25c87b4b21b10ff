"""The schema stays ready to distribute by org_id (Citus: docs/scaling.md, step 2).

docs/scaling.md holds three machine-readable tables that this test reads:

- "table | class | why": every table of schema billing is `distributed` (by org_id, co-located
  with billing.wallets), `reference` (replicated to every node) or `local` (on the coordinator).
- "constraint | table | blocks because | plan": every unique index, primary key, unique
  constraint or foreign key that would block that layout, with its plan.
- "function | placement | why": every api function with an `org_id` argument is either
  `delegated` (create_distributed_function on org_id) or kept on the `coordinator`.

Citus's rules (https://docs.citusdata.com/en/stable/develop/reference_ddl.html): a primary key
or unique constraint of a distributed table must include the distribution column; a foreign key
is allowed between co-located distributed tables when it includes the distribution column on
both sides, from a distributed (or local) table to a reference table, and between local and
reference tables; never from a reference or local table to a distributed table, nor from a
distributed table to a local one.

The test fails for a blocking constraint the doc does not list, for a listed name that no longer
blocks or no longer exists (so the doc cannot rot), and for a billing table the doc does not
classify.
"""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
CLASSES = {"distributed", "reference", "local"}
PLACEMENTS = {"delegated", "coordinator"}
DISTRIBUTION_COLUMN = "org_id"
ANCHOR = "billing.wallets"


# ---------------------------------------------------------------------------- the doc


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of the text: (header cells, body rows), cells stripped."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def the_table(first: str, must_have: str, text: str | None = None) -> list[dict]:
    """The one doc table whose first header cell is `first` and that has a `must_have` column,
    as dicts keyed by lowercase header."""
    found = [
        (h, rows)
        for h, rows in markdown_tables(DOC.read_text() if text is None else text)
        if h and h[0].lower() == first and must_have in [c.lower() for c in h]
    ]
    assert len(found) == 1, (
        f"docs/scaling.md must hold exactly one table headed '| {first} | ... | {must_have} |'"
    )
    header, rows = found[0]
    keys = [c.lower() for c in header]
    return [dict(zip(keys, row, strict=True)) for row in rows]


def code_name(cell: str) -> str:
    """The name in backticks at the start of a cell: `billing.wallets` -> billing.wallets."""
    match = re.match(r"^`([^`]+)`", cell)
    assert match, f"the first column must start with a name in backticks: {cell!r}"
    return match.group(1)


def classification() -> dict[str, str]:
    rows = the_table("table", "class")
    classes = {code_name(r["table"]): r["class"].strip("`* ").lower() for r in rows}
    assert len(classes) == len(rows), "a table is classified twice in docs/scaling.md"
    for row in rows:
        assert row["class"].strip("`* ").lower() in CLASSES, f"unknown class in {row}"
        assert len(row["why"]) >= 10, f"say why {row['table']} is {row['class']}"
    return classes


def listed_exceptions(text: str | None = None) -> dict[str, dict]:
    rows = the_table("constraint", "plan", text)
    listed = {code_name(r["constraint"]): r for r in rows}
    assert len(listed) == len(rows), "a constraint is listed twice in docs/scaling.md"
    for name, row in listed.items():
        assert len(row["plan"]) >= 10, f"{name} needs a plan in docs/scaling.md"
    return listed


def function_placement() -> dict[str, str]:
    rows = the_table("function", "placement")
    placements = {code_name(r["function"]): r["placement"].strip("`* ").lower() for r in rows}
    for row in rows:
        assert row["placement"].strip("`* ").lower() in PLACEMENTS, f"unknown placement in {row}"
    return placements


# ---------------------------------------------------------------------------- the catalog


def billing_tables(db) -> dict[str, dict]:
    """Every table of schema billing (partitions excluded: the parent is what is distributed),
    with its org_id column, if any."""
    rows = db.execute(
        """
        SELECT c.oid, 'billing.' || c.relname AS name,
               (SELECT a.attnum FROM pg_attribute AS a
                 WHERE a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped) AS org_attnum,
               (SELECT a.attnotnull FROM pg_attribute AS a
                 WHERE a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped) AS org_not_null
          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE n.nspname = 'billing' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
    """,
        (DISTRIBUTION_COLUMN, DISTRIBUTION_COLUMN),
    ).fetchall()
    return {r["name"]: r for r in rows}


def unique_indexes(db) -> list[dict]:
    """Every unique index (those behind PRIMARY KEY and UNIQUE constraints included) and every
    exclusion constraint of a billing table, with its key columns (None for an expression)."""
    return db.execute("""
        SELECT ic.relname::text AS name, 'billing.' || t.relname AS table_name,
               CASE WHEN i.indisprimary THEN 'primary key'
                    WHEN con.contype = 'u' THEN 'unique constraint'
                    WHEN con.contype = 'x' THEN 'exclusion constraint'
                    ELSE 'unique index' END AS kind,
               ARRAY(SELECT a.attname::text
                       FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                       LEFT JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE k.n <= i.indnkeyatts
                      ORDER BY k.n) AS columns
          FROM pg_index AS i
          JOIN pg_class AS ic ON ic.oid = i.indexrelid
          JOIN pg_class AS t ON t.oid = i.indrelid
          JOIN pg_namespace AS n ON n.oid = t.relnamespace
          LEFT JOIN pg_constraint AS con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u', 'x')
         WHERE n.nspname = 'billing' AND NOT t.relispartition
           AND (i.indisunique OR con.contype = 'x')
    """).fetchall()


def foreign_keys(db) -> list[dict]:
    """Every foreign key from or to a billing table, with its column pairs."""
    return db.execute("""
        SELECT con.conname AS name,
               src_ns.nspname || '.' || src.relname AS table_name,
               dst_ns.nspname || '.' || dst.relname AS target,
               ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, n)
                       JOIN pg_attribute AS a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                      ORDER BY k.n) AS columns,
               ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, n)
                       JOIN pg_attribute AS a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
                      ORDER BY k.n) AS target_columns
          FROM pg_constraint AS con
          JOIN pg_class AS src ON src.oid = con.conrelid
          JOIN pg_namespace AS src_ns ON src_ns.oid = src.relnamespace
          JOIN pg_class AS dst ON dst.oid = con.confrelid
          JOIN pg_namespace AS dst_ns ON dst_ns.oid = dst.relnamespace
         WHERE con.contype = 'f' AND 'billing' IN (src_ns.nspname, dst_ns.nspname)
           AND con.conparentid = 0
    """).fetchall()


def api_functions_with_org_id(db) -> dict[str, list[str]]:
    """Every api function with an input argument named org_id (OUT columns named org_id, as in
    RETURNS TABLE, do not count): regprocedure text -> input argument names."""
    db.execute("SET search_path = ''")  # regprocedure text then always names the schema
    try:
        rows = db.execute("""
            SELECT p.oid::regprocedure::text AS signature,
                   ARRAY(SELECT a.name FROM unnest(p.proargnames, p.proargmodes) AS a(name, mode)
                          WHERE coalesce(a.mode, 'i') IN ('i', 'b', 'v')) AS args
              FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
             WHERE n.nspname = 'api' AND p.proargnames IS NOT NULL
        """).fetchall()
    finally:
        db.execute("RESET search_path")
    return {r["signature"]: r["args"] for r in rows if DISTRIBUTION_COLUMN in r["args"]}


# ---------------------------------------------------------------------------- the rules


def blockers(db, classes: dict[str, str]) -> dict[str, str]:
    """Every constraint that blocks distributing the tables as classified: name -> why."""
    found = {}
    for index in unique_indexes(db):
        if classes.get(index["table_name"]) == "distributed" and DISTRIBUTION_COLUMN not in index["columns"]:
            found[index["name"]] = (
                f"{index['kind']} on {index['table_name']} "
                f"({', '.join(c or '<expression>' for c in index['columns'])}) lacks org_id"
            )
    for fk in foreign_keys(db):
        source, target = classes.get(fk["table_name"]), classes.get(fk["target"])
        pairs = list(zip(fk["columns"], fk["target_columns"], strict=True))
        if source == "distributed" and target == "distributed":
            if (DISTRIBUTION_COLUMN, DISTRIBUTION_COLUMN) not in pairs:
                found[fk["name"]] = "foreign key between distributed tables without org_id on both sides"
        elif target == "distributed":
            found[fk["name"]] = f"foreign key from a {source} table to a distributed table"
        elif source == "distributed" and target == "local":
            found[fk["name"]] = "foreign key from a distributed table to a local table"
    return found


# ---------------------------------------------------------------------------- the tests


def test_every_billing_table_is_classified_and_every_classified_table_exists(db):
    classes = classification()
    tables = billing_tables(db)
    assert sorted(set(tables) - set(classes)) == [], (
        "new billing tables: classify them in docs/scaling.md (distributed / reference / local)"
    )
    assert sorted(set(classes) - set(tables)) == [], "docs/scaling.md classifies tables that no longer exist"


def test_distributed_tables_have_a_not_null_org_id_and_are_anchored_on_wallets(db):
    classes = classification()
    tables = billing_tables(db)
    assert classes[ANCHOR] == "distributed"
    for name, cls in classes.items():
        if cls == "distributed":
            assert tables[name]["org_attnum"] is not None, f"{name} is distributed but has no org_id"
            assert tables[name]["org_not_null"], f"{name} is distributed by org_id, which must be NOT NULL"


def test_org_scoped_tables_not_distributed_are_deliberate(db):
    """A table with an org_id column that is not distributed must say why in the doc (webhook
    inbox: the org is unknown at ingest; routing: looked up before the org is known)."""
    classes = classification()
    with_org = {name for name, t in billing_tables(db).items() if t["org_attnum"] is not None}
    kept_apart = sorted(name for name in with_org if classes.get(name) != "distributed")
    rows = {code_name(r["table"]): r["why"] for r in the_table("table", "class")}
    for name in kept_apart:
        assert "org" in rows[name].lower(), (
            f"{name} has org_id yet is not distributed: say why (mention the org)"
        )


def unplanned_and_stale(found: dict[str, str], listed: dict[str, dict]) -> tuple[dict, list]:
    """Blockers the doc does not list, and listed names that do not block (or do not exist)."""
    return (
        {name: why for name, why in found.items() if name not in listed},
        sorted(set(listed) - set(found)),
    )


def test_no_constraint_blocks_distribution_except_those_the_doc_plans_for(db):
    classes = classification()
    found = blockers(db, classes)
    listed = listed_exceptions()
    unplanned, stale = unplanned_and_stale(found, listed)
    assert unplanned == {}, (
        "constraints that would block distribution by org_id: include org_id, or list them in "
        "docs/scaling.md (constraint | table | blocks because | plan)"
    )
    assert stale == [], (
        "docs/scaling.md lists constraints that no longer block (or no longer exist): remove them"
    )
    for name, row in listed.items():
        table = code_name(row["table"])
        owner = {i["name"]: i["table_name"] for i in unique_indexes(db)} | {
            f["name"]: f["table_name"] for f in foreign_keys(db)
        }
        assert owner[name] == table, f"docs/scaling.md puts {name} on {table}, it is on {owner[name]}"


def test_every_api_function_with_an_org_id_argument_has_a_placement(db):
    placements = function_placement()
    functions = api_functions_with_org_id(db)
    assert sorted(set(functions) - set(placements)) == [], (
        "api functions with an org_id argument: place them in docs/scaling.md (delegated / coordinator)"
    )
    assert sorted(set(placements) - set(functions)) == [], (
        "docs/scaling.md places functions that no longer exist with an org_id argument"
    )


def test_the_doc_delegation_ddl_names_existing_functions_by_their_org_id_argument(db):
    """The create_distributed_function calls in the doc are exactly the delegated functions."""
    calls = re.findall(
        r"create_distributed_function\(\s*'([^']+)'\s*,\s*'([^']+)'\s*,\s*colocate_with\s*:=\s*'([^']+)'",
        DOC.read_text(),
    )
    assert calls, "docs/scaling.md shows no create_distributed_function call"
    functions = api_functions_with_org_id(db)
    delegated = {name for name, placement in function_placement().items() if placement == "delegated"}
    assert {signature for signature, _, _ in calls} == delegated
    for signature, argument, colocate_with in calls:
        assert argument == DISTRIBUTION_COLUMN and argument in functions[signature]
        assert colocate_with == ANCHOR


@pytest.mark.parametrize(
    "table",
    [
        "billing.settings",
        "billing.webhook_events",
        "billing.reconciliation_runs",
        "billing.discrepancies",
        "billing.vapi_routes",
    ],
)
def test_the_tables_without_a_tenant_are_reference_or_local(table):
    assert classification()[table] in {"reference", "local"}


# ---------------------------------------------------------------------------- the checker itself


def test_the_checker_flags_what_citus_would_refuse(db):
    """A new org table with an id primary key and a global unique column is unclassified, and
    once classified distributed its two keys block; a foreign key carrying org_id on both sides
    does not; a reference table pointing at wallets does."""
    db.execute("""
        CREATE TABLE billing.scratch_things (
          id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
          org_id uuid NOT NULL REFERENCES billing.wallets (org_id),
          ref text UNIQUE,
          CONSTRAINT scratch_things_org_id_key UNIQUE (org_id, id));
        CREATE TABLE billing.scratch_children (
          org_id uuid NOT NULL,
          thing_id bigint NOT NULL,
          CONSTRAINT scratch_children_thing_fkey FOREIGN KEY (org_id, thing_id)
            REFERENCES billing.scratch_things (org_id, id),
          CONSTRAINT scratch_children_loose_fkey FOREIGN KEY (thing_id)
            REFERENCES billing.scratch_things (id));
    """)
    assert {"billing.scratch_things", "billing.scratch_children"} <= set(billing_tables(db)) - set(
        classification()
    )

    classes = dict(
        classification(),
        **{"billing.scratch_things": "distributed", "billing.scratch_children": "distributed"},
    )
    found = blockers(db, classes)
    assert {"scratch_things_pkey", "scratch_things_ref_key", "scratch_children_loose_fkey"} <= set(found)
    assert not {
        "scratch_things_org_id_key",
        "scratch_things_org_id_fkey",
        "scratch_children_thing_fkey",
    } & set(found)

    classes["billing.scratch_things"] = "reference"
    found = blockers(db, classes)
    assert "scratch_things_org_id_fkey" in found  # reference -> distributed
    assert "scratch_things_pkey" not in found  # a reference table may have any unique key


def test_the_doc_cannot_rot(db):
    """Dropping a planned row, or keeping a row for a constraint that is gone, both fail."""
    text = DOC.read_text()
    found = blockers(db, classification())
    row = next(line for line in text.splitlines() if line.startswith("| `holds_purpose_ref_key`"))
    unplanned, stale = unplanned_and_stale(found, listed_exceptions(text.replace(row + "\n", "")))
    assert list(unplanned) == ["holds_purpose_ref_key"] and stale == []
    ghost = row.replace("holds_purpose_ref_key", "holds_ghost_key")
    unplanned, stale = unplanned_and_stale(found, listed_exceptions(text.replace(row, row + "\n" + ghost)))
    assert unplanned == {} and stale == ["holds_ghost_key"]
