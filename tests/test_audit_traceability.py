"""The audits name the tests that prove each claim (docs/p0-audit.md for the eight P0 risks,
docs/transaction-boundaries.md for every money-moving operation). These checks fail as soon as a
named test is renamed, removed or no longer collected, so the audit answer cannot rot silently.

Test ids are collected the way pytest itself reports them (`pytest --collect-only -q` in a
subprocess), which is the only faithful source for parametrized ids such as
`...::test_bad_signature_is_400_and_stores_nothing[stale]`. Only the files the documents cite are
collected, and never this file, so the check does not recurse into itself.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
P0_AUDIT = ROOT / "docs" / "p0-audit.md"
BOUNDARIES = ROOT / "docs" / "transaction-boundaries.md"
DOCUMENTS = (P0_AUDIT, BOUNDARIES)
THIS_FILE = "tests/test_audit_traceability.py"

# A test id is written in backticks: `tests/<file>.py::<name>[<params>]` (params may hold spaces).
QUOTED_ID = re.compile(r"`(tests/[^`\s]+?\.py::[^`]+)`")
# Any mention that looks like a test id, quoted or not (to refuse ids the parser would skip).
ANY_ID = re.compile(r"tests/[\w./-]+\.py::")
URL = re.compile(r"https?://[^\s)>\]]+")
RISK_HEADING = re.compile(r"^##\s+(P0-\d+)\b.*$", re.MULTILINE)
ANY_H2 = re.compile(r"^##\s", re.MULTILINE)
RISKS = [f"P0-{n}" for n in range(1, 9)]


def cited_ids(text: str) -> list[str]:
    """Every backticked test id in a document, in order of appearance."""
    return [match.strip() for match in QUOTED_ID.findall(text)]


def unquoted_mentions(text: str) -> list[str]:
    """Test-id-looking text outside backticks: the parser would not see it, so it is refused."""
    remainder = QUOTED_ID.sub("", text)
    return [remainder[m.start() : m.start() + 80].splitlines()[0] for m in ANY_ID.finditer(remainder)]


def missing_ids(cited: list[str], collected: set[str]) -> list[str]:
    """The cited ids pytest does not collect (renamed, removed, or their file is broken)."""
    return sorted({test_id for test_id in cited if test_id not in collected})


def risk_sections(text: str) -> dict[str, list[str]]:
    """Each `## P0-n` section's text (up to the next level-2 heading), by risk; a risk
    headed twice keeps every section so the duplicate can be reported."""
    sections: dict[str, list[str]] = {}
    for match in RISK_HEADING.finditer(text):
        following = ANY_H2.search(text, match.end())
        body = text[match.start() : following.start() if following else len(text)]
        sections.setdefault(match.group(1), []).append(body)
    return sections


def collect(files: list[str]) -> tuple[set[str], str]:
    """The node ids pytest collects from these files, and its output for error messages."""
    files = sorted({f for f in files if f != THIS_FILE and (ROOT / f).is_file()})
    if not files:
        return set(), ""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    ids = {line.strip() for line in proc.stdout.splitlines() if "::" in line and line.startswith("tests/")}
    # A parametrized test may be cited by its function (all its cases) or by one case.
    ids |= {test_id.split("[", 1)[0] for test_id in ids}
    return ids, proc.stdout[-4000:] + proc.stderr[-2000:]


class Documents(dict):
    """The audit texts by path (a short repr keeps failure reports readable)."""

    def __repr__(self) -> str:
        return f"<audit documents: {', '.join(p.name for p in self)}>"


@pytest.fixture(scope="module")
def documents() -> Documents:
    missing = [str(doc.relative_to(ROOT)) for doc in DOCUMENTS if not doc.is_file()]
    assert not missing, f"audit documents missing: {missing}"
    return Documents({doc: doc.read_text(encoding="utf-8") for doc in DOCUMENTS})


@pytest.fixture(scope="module")
def collected(documents) -> tuple[set[str], str]:
    files = {test_id.split("::", 1)[0] for text in documents.values() for test_id in cited_ids(text)}
    return collect(sorted(files))


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: d.name)
def test_every_test_named_in_the_audit_exists(doc, documents, collected):
    ids = cited_ids(documents[doc])
    assert ids, f"{doc.name} names no test at all"
    collected_ids, output = collected
    absent = missing_ids(ids, collected_ids)
    assert not absent, (
        f"{doc.name} names tests that pytest no longer collects (renamed, removed, or their file "
        f"fails to import): {absent}\n--- pytest --collect-only ---\n{output}"
    )


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: d.name)
def test_test_ids_are_written_in_backticks(doc, documents):
    """An id outside backticks would escape the existence check above."""
    assert unquoted_mentions(documents[doc]) == []


def test_each_p0_risk_has_one_section_with_proof_and_vendor_guidance(documents):
    sections = risk_sections(documents[P0_AUDIT])
    problems = []
    for risk in RISKS:
        bodies = sections.get(risk, [])
        if len(bodies) != 1:
            problems.append(f"{risk}: {len(bodies)} sections headed '## {risk}' (want exactly one)")
            continue
        body = bodies[0]
        # Any cited test counts, including the regression tests of the gaps the boundary audit
        # found (tests/test_boundary_gaps.py): they run with the suite like every other test.
        if not cited_ids(body):
            problems.append(f"{risk}: no test id that proves it")
        if not URL.search(body):
            problems.append(f"{risk}: no vendor URL")
    unexpected = sorted(set(sections) - set(RISKS))
    if unexpected:
        problems.append(f"sections for unknown risks: {unexpected}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for():
    """The parsing itself: a renamed test, an unquoted id, a section without a URL."""
    text = (
        "## P0-1 Something\n"
        "Proved by `tests/test_a.py::test_ok` and `tests/test_a.py::test_p[x y-1]`.\n"
        "See https://example.com/doc.\n"
        "## P0-2 Other\n"
        "Proved by `tests/test_a.py::test_renamed_meanwhile`, and tests/test_b.py::test_bare.\n"
    )
    ids = cited_ids(text)
    assert ids == [
        "tests/test_a.py::test_ok",
        "tests/test_a.py::test_p[x y-1]",
        "tests/test_a.py::test_renamed_meanwhile",
    ]
    assert missing_ids(ids, {"tests/test_a.py::test_ok", "tests/test_a.py::test_p[x y-1]"}) == [
        "tests/test_a.py::test_renamed_meanwhile"
    ]
    assert len(unquoted_mentions(text)) == 1
    sections = risk_sections(text)
    assert URL.search(sections["P0-1"][0]) and not URL.search(sections["P0-2"][0])
