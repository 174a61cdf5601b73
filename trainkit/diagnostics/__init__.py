"""Hang diagnostics and ``trainkit diagnose``.

* ``watchdog``  pure hang-detection logic (which ranks are missing, when to repeat a warning)
* ``stacks``    capture a rank's Python stack: py-spy on the rank's node, faulthandler fallback
* ``classify``  what a stack means: user code, collective, data loading, report(), dead
* ``hang``      the controller-side executor: dump, classify, write ``diagnostics/``, emit the event
* ``run_report`` ``trainkit diagnose``'s typed ``RunReport``, read from a run folder (JSON and text only)
* ``render``    a ``RunReport`` as text (``render_text``, ``render_short``)
* ``live``      ``trainkit diagnose --live``: py-spy on the ranks of a running run
* ``report``    the old import path of run_report and render (re-exports only)
* ``debug``     debugpy listeners for one rank (``TRAINKIT_DEBUG_RANK``) and post-mortem

Nothing here is imported by trainkit at start-up; each module imports Ray or torch only
where it needs them.
"""

from trainkit.diagnostics.debug import RankDebugger

__all__ = ["RankDebugger"]
