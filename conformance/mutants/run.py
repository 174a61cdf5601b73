"""Apply one mutant to a temporary copy of the tree and run its cases there, in a bounded subprocess.

Never touches the installed code: ``snapshot`` copies the packages a conformance run
imports (``trainkit``, ``conformance``, ``trainkit_testing``, ``fault_injection``) and
``pyproject.toml`` into a temporary folder once; each mutant gets its own copy of that
snapshot with its one replacement applied (checked to match exactly once, and to compile).
The cases run in ``python -m conformance.mutants._child`` with the copy as working directory
and first on ``PYTHONPATH``, so the pytest process, the suite's private Ray and every Ray
worker (they inherit its environment) import the copy; the child checks that, and the
baseline run also probes a rank worker and a Ray task.

Every run is bounded: past ``timeout_s`` the child's process group is killed, then every
process carrying the run's marker variable (``TRAINKIT_MUTANT_RUN``; Ray's processes inherit
it) is killed by pid, and its Ray temp folder removed. A run that timed out kills the mutant
("timeout"). Runs in the driving process (bench_mutation.py, the CI test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from conformance.mutants.catalog import ROOT, Mutant

COPIED = ("trainkit", "conformance", "trainkit_testing", "fault_injection")
COPIED_FILES = ("pyproject.toml",)
MARKER_VAR = "TRAINKIT_MUTANT_RUN"  # set in each child's environment: finds its processes (Ray's too) at the end
CASE_TIMEOUT_S = 90  # pytest-timeout per case in the child (a case's own bound, set by the suite's conftest, comes first)
LOG_DIR = os.path.join(tempfile.gettempdir(), "tkmut-logs")  # each mutant's last run output, for a look afterwards
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".basetemp", ".pytest_cache")


class BaselineError(Exception):
    """The suite fails (or lacks cases) without any mutant: no kill would mean anything."""


@dataclass
class RunResult:
    """One subprocess run of cases: per-case outcomes, or why there are none."""

    cases: dict = field(default_factory=dict)  # case id -> (outcome, reason)
    timed_out: bool = False
    error: str = ""
    wall_s: float = 0.0
    probe: Optional[dict] = None
    log_tail: str = ""


@dataclass
class MutantResult:
    name: str
    category: str
    rule: str
    status: str  # killed | timeout | survived | error
    killed_by: tuple = ()
    wall_s: float = 0.0
    detail: str = ""

    @property
    def killed(self) -> bool:
        return self.status in ("killed", "timeout")

    def killed_by_text(self) -> str:
        if self.status == "timeout":
            return "timeout (run killed" + (f"; failed first: {', '.join(self.killed_by)}" if self.killed_by
                                            else "") + ")"
        if self.status == "killed":
            return ", ".join(self.killed_by)
        if self.status == "error":
            return f"ERROR: {self.detail}"
        return "SURVIVED"

    def to_dict(self) -> dict:
        return {"mutant": self.name, "category": self.category, "rule": self.rule, "status": self.status,
                "killed": self.killed, "killed_by": list(self.killed_by), "wall_s": round(self.wall_s, 1),
                "detail": self.detail}


def snapshot(root: str = ROOT) -> str:
    """A temporary copy of what a conformance run imports (the caller removes it)."""
    dest = tempfile.mkdtemp(prefix="tkmut-base-")
    for name in COPIED:
        shutil.copytree(os.path.join(root, name), os.path.join(dest, name), ignore=_IGNORED)
    for name in COPIED_FILES:
        shutil.copy2(os.path.join(root, name), os.path.join(dest, name))
    return dest


def mutated_copy(base: str, mutant: Optional[Mutant]) -> str:
    """A copy of the snapshot ``base`` with ``mutant`` applied (None: unmutated)."""
    dest = tempfile.mkdtemp(prefix="tkmut-")
    os.rmdir(dest)
    shutil.copytree(base, dest, ignore=_IGNORED)
    if mutant is not None:
        path = os.path.join(dest, mutant.path)
        with open(path) as f:
            text = mutant.mutate(f.read())  # MutantError unless its text occurs exactly once
        compile(text, path, "exec")  # a catalog typo is a SyntaxError here, never a "kill"
        with open(path, "w") as f:
            f.write(text)
    return dest


def _marked(marker: str) -> list[tuple[int, str]]:
    """(pid, RAY_TMPDIR) of live processes whose environment holds the run's marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if needle not in env:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        tmp = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RAY_TMPDIR=")), "")
        found.append((int(entry), tmp))
    return found


def tear_down(proc: subprocess.Popen, marker: str, grace_s: float = 10.0) -> int:
    """Kill the child's process group if it still runs, then every process with ``marker``; returns how
    many marked processes had to be killed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
    deadline = time.monotonic() + grace_s  # a finished child's Ray shuts down by itself: give it a moment
    left = _marked(marker)
    while left and time.monotonic() < deadline and proc.returncode == 0:
        time.sleep(0.2)
        left = _marked(marker)
    tmpdirs = set()
    killed = 0
    for _ in range(5):  # raylets may still be starting workers: until none is left
        left = _marked(marker)
        if not left:
            break
        for pid, tmp in left:
            tmpdirs.add(tmp)
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    for tmp in tmpdirs:
        if tmp.startswith("/tmp/tkconf-"):  # the private Ray's temp folder (conformance.harness.ray_for)
            shutil.rmtree(tmp, ignore_errors=True)
    return killed


def run_cases(copy_root: str, case_ids: Sequence[str], *, timeout_s: float, case_timeout_s: int = CASE_TIMEOUT_S,
              probe: bool = False) -> RunResult:
    """Run ``case_ids`` on the ``ray`` backend inside ``copy_root``, bounded by ``timeout_s``."""
    marker = uuid.uuid4().hex
    out = os.path.join(copy_root, "mutant-run.json")
    log_path = os.path.join(copy_root, "mutant-run.log")
    env = dict(os.environ, TRAINKIT_PROGRESS="0", PYTHONDONTWRITEBYTECODE="1", **{MARKER_VAR: marker})
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([copy_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "conformance.mutants._child", "--root", copy_root, "-k", " or ".join(case_ids),
           "--json", out, "--case-timeout-s", str(case_timeout_s)] + (["--probe"] if probe else [])
    res = RunResult()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=copy_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            res.timed_out = True
        finally:
            tear_down(proc, marker)
    res.wall_s = time.monotonic() - t0
    with open(log_path, errors="replace") as f:
        res.log_tail = f.read()[-3000:]
    if os.path.exists(out):
        with open(out) as f:
            doc = json.load(f)
        res.probe = doc.get("probe")
        res.error = doc.get("error", "")
        res.cases = with_rollups({c["id"]: (c["outcome"], c["reason"]) for c in doc.get("cases", [])})
    elif not res.timed_out:
        res.error = f"the child exited {proc.returncode} without a report"
    return res


def with_rollups(cases: dict) -> dict:
    """Add each parametrized case's own id (``PERSIST-003`` for ``PERSIST-003[local]`` and
    ``PERSIST-003[s3]``): failed when any variant failed, passed when every variant passed,
    else the first variant's other outcome. The catalog names cases; the suite runs variants."""
    variants: dict = {}
    for cid, value in cases.items():
        if "[" in cid:
            variants.setdefault(cid.split("[", 1)[0], []).append((cid, value))
    out = dict(cases)
    for base, vs in variants.items():
        if base in out:
            continue
        failed = [(cid, v) for cid, v in vs if v[0] == "failed"]
        if failed:
            out[base] = ("failed", "; ".join(f"{cid}: {v[1]}" for cid, v in failed))
        elif all(v[0] == "passed" for _cid, v in vs):
            out[base] = ("passed", "")
        else:
            cid, v = next((cid, v) for cid, v in vs if v[0] != "passed")
            out[base] = (v[0], f"{cid}: {v[1]}")
    return out


def judge(mutant: Mutant, res: RunResult) -> MutantResult:
    """Killed when a selected case failed (or the bounded run timed out); survived when all passed."""
    failed = tuple(cid for cid in mutant.cases if res.cases.get(cid, ("",))[0] == "failed")
    failed = tuple(f"{cid} (case timeout)" if "Timeout" in res.cases[cid][1] else cid for cid in failed)
    base = dict(name=mutant.name, category=mutant.category, rule=mutant.rule, wall_s=res.wall_s)
    if res.timed_out:
        return MutantResult(status="timeout", killed_by=failed, detail="the run passed its bound", **base)
    if failed:
        return MutantResult(status="killed", killed_by=failed, **base)
    if res.error:
        last = [line for line in res.log_tail.splitlines() if line.strip()][-1:] or [""]
        return MutantResult(status="error", detail=f"{res.error[:200]}; last output: {last[0][:200]}", **base)
    missing = [cid for cid in mutant.cases if res.cases.get(cid, ("",))[0] != "passed"]
    if missing:
        what = ", ".join(f"{cid}: {res.cases.get(cid, ('not collected',))[0]}" for cid in missing)
        return MutantResult(status="error", detail=f"cases neither passed nor failed: {what}", **base)
    return MutantResult(status="survived", **base)


def baseline(base: str, mutants: Iterable[Mutant], *, timeout_s: float, case_timeout_s: int = CASE_TIMEOUT_S) -> RunResult:
    """Run every case the mutants name on the unmutated copy (with the import probe); raise
    ``BaselineError`` unless each one passed and the copy was the code under test."""
    ids = sorted({cid for m in mutants for cid in m.cases})
    copy_root = mutated_copy(base, None)
    try:
        res = run_cases(copy_root, ids, timeout_s=timeout_s, case_timeout_s=case_timeout_s, probe=True)
    finally:
        shutil.rmtree(copy_root, ignore_errors=True)
    if res.timed_out:
        raise BaselineError(f"the baseline run (no mutant) of {len(ids)} case(s) did not end within {timeout_s:.0f} s")
    if res.error:
        raise BaselineError(f"the baseline run (no mutant) failed: {res.error}\n{res.log_tail}")
    bad = {cid: res.cases.get(cid, ("not collected", ""))for cid in ids}
    bad = {cid: v for cid, v in bad.items() if v[0] != "passed"}
    if bad:
        lines = "\n".join(f"  {cid}: {o} {r}" for cid, (o, r) in sorted(bad.items()))
        raise BaselineError(f"without any mutant, {len(bad)} of {len(ids)} case(s) do not pass on the ray "
                            f"backend, so a failure under a mutant would mean nothing:\n{lines}")
    return res


def run_mutant(base: str, mutant: Mutant, *, timeout_s: float, case_timeout_s: int = CASE_TIMEOUT_S) -> MutantResult:
    """Run ``mutant``'s cases on its copy; the child's output is kept in ``LOG_DIR/<name>.log``."""
    copy_root = mutated_copy(base, mutant)
    try:
        res = run_cases(copy_root, mutant.cases, timeout_s=timeout_s, case_timeout_s=case_timeout_s)
        os.makedirs(LOG_DIR, exist_ok=True)
        shutil.copyfile(os.path.join(copy_root, "mutant-run.log"), os.path.join(LOG_DIR, f"{mutant.name}.log"))
        return judge(mutant, res)
    finally:
        shutil.rmtree(copy_root, ignore_errors=True)


def run_all(mutants: Sequence[Mutant], *, timeout_s: float, case_timeout_s: int = CASE_TIMEOUT_S,
            on_start: Callable[[Mutant], None] = lambda m: None,
            on_done: Callable[[MutantResult], None] = lambda r: None, root: str = ROOT) -> tuple:
    """Baseline, then each mutant in turn: ``(baseline RunResult, [MutantResult])``."""
    base = snapshot(root)
    try:
        for m in mutants:  # every replacement must match the snapshot before anything runs
            with open(os.path.join(base, m.path)) as f:
                m.check(f.read())
        base_res = baseline(base, mutants, timeout_s=timeout_s * 2, case_timeout_s=case_timeout_s)
        results = []
        for m in mutants:
            on_start(m)
            r = run_mutant(base, m, timeout_s=timeout_s, case_timeout_s=case_timeout_s)
            results.append(r)
            on_done(r)
        return base_res, results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def score(results: Sequence[MutantResult]) -> float:
    """Killed / all, in percent."""
    return 100.0 * sum(r.killed for r in results) / len(results) if results else 0.0
