"""Outcomes per case, the table by category, and the JSON report.

``Collector`` is a pytest plugin object: it records each case's outcome (passed,
failed, xfailed with its reason, xpassed, skipped with its reason) as pytest reports
them, prints the table in the terminal summary, and gives the JSON document
``{backend, version, cases: [{id, category, outcome, reason}]}`` (written by the shared
``trainkit.jsonout.write_json``, also importable from here). ``render_table`` and
``to_json`` are pure and unit-tested. Runs in the pytest process.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

from trainkit.jsonout import write_json  # noqa: F401 - the one --json writer, kept importable from here

from conformance.case import CATEGORIES, info_of

OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped")


def _reason_of_skip(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        text = str(lr[2])
        return text[len("Skipped: "):] if text.startswith("Skipped: ") else text
    return str(lr or "")


def _first_line(text: str, limit: int = 300) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


class Collector:
    """pytest plugin: one record per conformance case of the session."""

    name = "trainkit-conformance-collector"

    def __init__(self, backend: str = ""):
        self.backend = backend
        self.version = ""
        self.cases: dict[str, dict] = {}  # nodeid -> record

    # -- pytest hooks ----------------------------------------------------------------------
    def pytest_collection_finish(self, session) -> None:
        for item in session.items:
            info = info_of(item)
            if info is None:
                continue
            variant = getattr(getattr(item, "callspec", None), "id", "")  # DUR-007[s3]: one record per variant
            self.cases[item.nodeid] = {"id": f"{info.id}[{variant}]" if variant else info.id,
                                       "category": info.category_title, "outcome": "not run",
                                       "reason": "", "statement": info.statement, "extension": info.extension,
                                       "duration_s": 0.0}

    def pytest_runtest_logreport(self, report) -> None:
        rec = self.cases.get(report.nodeid)
        if rec is None:
            return
        rec["duration_s"] = round(rec["duration_s"] + float(getattr(report, "duration", 0.0) or 0.0), 3)
        xfail_reason = getattr(report, "wasxfail", None)
        if report.when == "setup":
            if report.skipped and xfail_reason is not None:
                rec.update(outcome="xfailed", reason=xfail_reason)
            elif report.skipped:
                rec.update(outcome="skipped", reason=_reason_of_skip(report))
            elif report.failed:
                rec.update(outcome="failed", reason="setup error: " + _first_line(report.longreprtext))
        elif report.when == "call":
            if xfail_reason is not None and report.skipped:
                rec.update(outcome="xfailed", reason=xfail_reason)
            elif xfail_reason is not None and report.passed:
                rec.update(outcome="xpassed", reason=xfail_reason)
            elif report.passed:
                rec.update(outcome="passed", reason="")
            elif report.skipped:
                rec.update(outcome="skipped", reason=_reason_of_skip(report))
            else:
                rec.update(outcome="failed", reason=_failure_line(report))
        elif report.when == "teardown" and report.failed and rec["outcome"] != "failed":
            rec.update(outcome="failed", reason="teardown error: " + _first_line(report.longreprtext))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.cases:
            terminalreporter.write(render_table(self.records(), self.backend))

    # -- results -------------------------------------------------------------------------
    def records(self) -> list[dict]:
        return sorted(self.cases.values(), key=lambda r: (_cat_order(r["category"]), r["id"]))

    def document(self) -> dict:
        return to_json(self.backend, self.version, self.records())

    def failed(self) -> list[dict]:
        return [r for r in self.cases.values() if r["outcome"] == "failed"]


def _failure_line(report) -> str:
    """``CASE-ID broken: <rule> -- <what was observed>`` for a broken rule, else the error's first line."""
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    text = crash.message if crash is not None and getattr(crash, "message", "") else report.longreprtext
    marker = "ConformanceFailure: "
    if marker in text:
        lines = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        return " -- ".join(lines[:2])[:600]
    return _first_line(text, 500)


def _cat_order(title: str) -> int:
    titles = list(CATEGORIES.values())
    return titles.index(title) if title in titles else len(titles)


def to_json(backend: str, version: str, records: list[dict]) -> dict:
    """The ``--json`` document."""
    return {"backend": backend, "version": version,
            "cases": [{"id": r["id"], "category": r["category"], "outcome": r["outcome"],
                       "reason": r.get("reason", "")} for r in records]}


def summarize(records: list[dict]) -> dict[str, dict[str, int]]:
    """category title -> outcome -> count, categories in contract order."""
    table: dict[str, dict[str, int]] = {}
    for r in sorted(records, key=lambda r: _cat_order(r["category"])):
        row = table.setdefault(r["category"], {o: 0 for o in OUTCOMES})
        if r["outcome"] in row:
            row[r["outcome"]] += 1
    return table


def render_table(records: list[dict], backend: str, width: int = 120) -> str:
    """The table by category, then one line per case that did not pass (with its reason)."""
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    table = Table(title=f"trainkit conformance: backend {backend}")
    table.add_column("category")
    for o in OUTCOMES:
        table.add_column(o, justify="right")
    totals = {o: 0 for o in OUTCOMES}
    for cat, row in summarize(records).items():
        table.add_row(cat, *(str(row[o]) for o in OUTCOMES))
        for o in OUTCOMES:
            totals[o] += row[o]
    table.add_row("total", *(str(totals[o]) for o in OUTCOMES), style="bold")
    console.print(table)
    notable = [r for r in records if r["outcome"] not in ("passed",)]
    for r in notable:
        console.print(f"{r['outcome']:>8}  {r['id']:<14} {r.get('reason', '')}", overflow="fold", highlight=False,
                      markup=False)  # ids like DUR-007[s3] are not rich markup
    return buf.getvalue()


def load_json(path: str) -> Optional[dict[str, Any]]:
    with open(path) as f:
        return json.load(f)
