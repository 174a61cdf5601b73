"""The ``case`` decorator: what makes a pytest function a conformance case.

Each case carries an id (``REPORT-003``), a category, a one-sentence behaviour
statement, the backend capabilities it needs, whether it is a trainkit extension
(behaviour trainkit adds beyond Ray Train 2.60), and known divergences of particular
backends (an ``xfail`` whose reason states the backend's observed behaviour). The
suite's conftest turns these into marks, skips and xfails for the backend under test, and a
failing case's report starts with its id and statement, so a broken backend's failures
name the rule it broke. Pure metadata: imports nothing heavy. Runs in the pytest process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# Category keys (used in ids' order, the table and docs/semantics.md), in contract order.
CATEGORIES = {
    "api": "API surface",
    "context": "context",
    "report": "report barrier",
    "result": "metrics and Result",
    "checkpoints": "checkpoints and retention",
    "persistence": "persistence and restore",
    "failures": "failures and retries",
    "elastic": "elastic",
    "preemption": "preemption",
    "collectives": "collectives",
    "data": "data sharding",
    "local": "local mode",
    "torchrun": "torchrun mode",
    "hang": "hang diagnosis",
    "durability": "durability",
}

_ID = re.compile(r"^[A-Z]+-\d{3}$")


@dataclass(frozen=True)
class Divergence:
    """A backend's known, documented difference from the contract on one case.

    The case is run and the divergence is *checked*: the case must end with ``raises`` (by
    default ``AssertionError``, the case's own check failing) whose message matches ``match``
    (a regular expression, searched), else the case fails: an adapter crash is not taken for
    the documented behaviour, and a case that passes is reported as a failure too (the
    divergence is gone: remove it), unless ``racy`` (Ray's behaviour is a race that sometimes
    keeps the rule). ``raises`` may be the name of a class of ``conformance.harness`` (such as
    ``"CaseTimeout"``: the backend hung and the case's bound ended it).
    """

    backend: str
    reason: str  # the backend's observed behaviour, stated as a fact
    run: bool = True  # kept for third-party cases; the suite's own cases all run (observe, never declare)
    raises: object = AssertionError  # an exception class, or a name in conformance.harness
    match: Optional[str] = None  # regex the exception's message must contain
    racy: bool = False  # a pass is accepted too (the behaviour is a documented race)


@dataclass(frozen=True)
class CaseInfo:
    id: str
    category: str  # a key of CATEGORIES
    statement: str
    requires: tuple = ()
    extension: bool = False
    divergences: tuple = field(default=())
    pending: Optional[str] = None  # callable name in conftest deciding "cannot pass yet", see conftest
    bound_s: float = 0.0  # this case's time bound (0: the suite's default, conftest.DEFAULT_BOUND_S)
    shared: bool = False  # never reaches the backend under test (API checks on trainkit's own objects)

    @property
    def category_title(self) -> str:
        return CATEGORIES[self.category]

    def reaches(self, backend: Any) -> bool:
        """Whether this case exercises ``backend`` at all: a ``shared`` case (trainkit's own objects,
        the same whatever the backend) only on ``local``, where it is certified; a local/torchrun case
        only on a backend that runs local mode itself (others leave it to trainkit's shared one,
        certified by ``--trainkit-backend=local``)."""
        if self.shared:
            return getattr(backend, "name", "") == "local"
        if self.category in ("local", "torchrun"):
            return bool(getattr(backend, "handles_local_mode", False))
        return True

    def divergence_for(self, backend: str) -> Optional[Divergence]:
        for d in self.divergences:
            if d.backend == backend:
                return d
        return None


REGISTRY: dict[str, CaseInfo] = {}


def case(case_id: str, category: str, statement: str, *, requires: tuple | list = (), extension: bool = False,
         ray_train: Optional[str] = None, ray_train_run: bool = True, ray_train_raises: object = AssertionError,
         ray_train_match: Optional[str] = None, ray_train_racy: bool = False, pending: Optional[str] = None,
         divergences: tuple = (), bound_s: float = 0.0, shared: bool = False) -> Callable:
    """Declare a conformance case.

    >>> @case("REPORT-001", "report", "report() returns on a rank only once every rank called it.",
    ...       requires=["multi_worker"])
    ... def test_report_is_a_barrier(tk): ...
    """
    if not _ID.match(case_id):
        raise ValueError(f"case id {case_id!r}: expected PREFIX-NNN")
    if category not in CATEGORIES:
        raise ValueError(f"case {case_id}: category {category!r} is not one of {sorted(CATEGORIES)}")
    divs = list(divergences)
    if ray_train is not None:
        divs.append(Divergence("ray_train", ray_train, ray_train_run, ray_train_raises, ray_train_match,
                               ray_train_racy))
    info = CaseInfo(case_id, category, statement, tuple(requires), extension, tuple(divs), pending, bound_s, shared)
    if REGISTRY.get(case_id, info) != info:  # the same module imported twice is fine; two cases with one id not
        raise ValueError(f"case id {case_id} is declared twice")
    REGISTRY[case_id] = info

    def wrap(fn: Callable) -> Callable:
        fn.conformance_case = info  # conftest turns it into marks (requires, extension) at collection
        return fn

    return wrap


def info_of(item) -> Optional[CaseInfo]:
    return getattr(getattr(item, "function", None), "conformance_case", None)
