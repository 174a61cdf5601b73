"""conformance: the backend-agnostic conformance suite.

Cases by category (``test_*.py``, each declared with ``case.case``: id, category,
one-sentence rule, required capabilities, extension flag, known divergences), the pytest
configuration that applies them to one backend (``conftest.py``), the harness cases run
training functions with (``harness.py``), the runner behind ``trainkit conformance``
(``runner.py``), the table and JSON report (``report.py``) and deliberately broken
backends for the suite's self-test (``broken.py``). The rules in prose: docs/semantics.md.
"""
