"""Old home of ``trainkit diagnose``'s report, kept for callers that import from here.

Re-exports only. New code imports ``load_report``, ``RunReport`` and ``DiagnoseError`` from
``trainkit.diagnostics.run_report``, ``render_text`` and ``render_short`` from
``trainkit.diagnostics.render``; the command itself is ``trainkit.cli.diagnose``.
Runs wherever it is imported.
"""

from trainkit.diagnostics.render import render_short, render_text
from trainkit.diagnostics.run_report import REPORT_VERSION, DiagnoseError, RunReport, load_report, open_run

__all__ = ["REPORT_VERSION", "DiagnoseError", "RunReport", "load_report", "open_run", "render_short", "render_text"]
