"""The "trainkit run" section of a failing test's report: run folder, failures, missing ranks of a hang.

The content comes from the diagnostics package (``trainkit.diagnostics.report``:
``load_report`` reads the run's ``events.jsonl`` and diagnostics folder,
``render_short`` writes a few lines: status, failures with rank / node / root cause,
hangs with the missing ranks and their innermost user frame). This module only adds
the run folder and never parses the event stream itself. Runs in the pytest process,
after the failing phase of a test.
"""

from __future__ import annotations


def failure_section(runs: list[str]) -> str:
    """The text of the report section for a failed test whose fits wrote ``runs`` (run folder URIs)."""
    parts = []
    for run in runs:
        parts.append(f"run folder: {run}")
        try:
            from trainkit.diagnostics.report import load_report, render_short

            parts.append(render_short(load_report(run)).rstrip())
        except Exception as e:  # noqa: BLE001 - the section must never hide the test's own failure
            parts.append(f"  (could not read the run: {type(e).__name__}: {e})")
    parts.append("(run folders of failing tests are kept; `trainkit diagnose <run folder>` shows everything)")
    return "\n".join(parts)
