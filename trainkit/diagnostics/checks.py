"""What is wrong with a run folder, said in words: the checks ``trainkit diagnose`` adds to a report.

* ``manifest_problems(state)``: ``run_state.json`` with fields of the wrong type (each one
  named, with what was expected); the fields that are wrong are dropped, so that the
  report is built from what can be trusted and never prints a damaged value as if it
  were true.
* ``checkpoint_problems(store, state)``: checkpoints the manifest names whose folder is
  missing or whose files are not what was committed (one listing of the run folder).

Pure except for ``checkpoint_problems``'s one listing; runs in the process of
``trainkit diagnose`` (and of the pytest plugin's failure report).
"""

from __future__ import annotations

from typing import Any

_MANIFEST_TYPES = {  # field -> (accepted types, words for a person)
    "status": ((str,), "a string"),
    "checkpoints": ((list,), "a list of checkpoint records"),
    "latest_checkpoint": ((str, type(None)), "a folder name or null"),
    "attempts": ((list,), "a list of attempt records"),
    "error": ((dict, str, type(None)), "an error record or null"),
    "name": ((str,), "a string"),
}
STATUSES = ("running", "finished", "failed", "aborted")


def manifest_problems(state: Any) -> tuple[dict, list[str]]:
    """``(the fields of state that can be trusted, the problems found)``."""
    if state is None:
        return {}, []
    if not isinstance(state, dict):
        return {}, [f"run_state.json is {type(state).__name__}, not an object: ignored"]
    good, problems = {}, []
    for key, value in state.items():
        want = _MANIFEST_TYPES.get(key)
        if want is not None and not isinstance(value, want[0]):
            problems.append(f"run_state.json: {key} is {type(value).__name__} {_short(value)}, expected "
                            f"{want[1]}: ignored")
            continue
        good[key] = value
    if "status" in good and good["status"] not in STATUSES:
        problems.append(f"run_state.json: status {good['status']!r} is not one of {', '.join(STATUSES)}: ignored")
        del good["status"]
    for key, fields in (("checkpoints", ("dir", "index")), ("attempts", ("attempt",))):
        rows = good.get(key)
        if rows is None:
            continue
        kept = [r for r in rows if isinstance(r, dict) and all(f in r for f in fields)]
        if len(kept) != len(rows):
            problems.append(f"run_state.json: {len(rows) - len(kept)} of {len(rows)} {key} record(s) are damaged "
                            f"(each needs {', '.join(fields)}): ignored")
            good[key] = kept
    return good, problems


def checkpoint_problems(store, state: dict) -> list[str]:
    """The checkpoints ``state`` names that are missing or damaged (a file gone, or of another size
    than at its commit): one listing of the run folder, sizes only."""
    from trainkit.result import verify_entries

    entries = [c for c in state.get("checkpoints") or [] if isinstance(c.get("dir"), str)]
    latest = state.get("latest_checkpoint")
    if isinstance(latest, str) and latest not in {c["dir"] for c in entries}:
        entries.append({"dir": latest})
    if not entries:
        return []
    try:
        verdicts = verify_entries(store, entries)
    except OSError as e:
        return [f"cannot list the run folder to check its checkpoints: {type(e).__name__}: {e}"]
    out = []
    for d, problem in verdicts.items():
        if problem is None:
            continue
        if problem == "its folder is missing":
            out.append(f"{d} is in run_state.json but its folder is missing: a resume cannot use it")
        else:
            out.append(f"{d} is damaged ({problem}): a resume skips it for the latest intact checkpoint")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
