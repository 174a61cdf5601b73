"""The named mutants of the reference backend: one small, realistic bug in one rule each.

A ``Mutant`` is data: its name, the category and the rule it breaks, the file (relative to
the repository root), one exact text replacement (``old`` must occur exactly once in that
file; ``apply`` fails loudly otherwise, so a refactor under the catalog is noticed at once),
the conformance cases that should see the bug (ids, joined into a ``-k`` expression) and,
for the fixed CI sample, the cases expected to fail.

Pure data and string checks: imports nothing heavy. Runs in the process that drives the
mutation check (``benchmarks/bench_mutation.py``, tests/conformance/test_mutation_sample.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MutantError(Exception):
    """A mutant cannot be applied: its ``old`` text is missing from, or repeated in, its file."""


@dataclass(frozen=True)
class Mutant:
    name: str
    category: str  # one of CATEGORIES below (the list of rule families)
    rule: str  # the rule the bug breaks, in a few words
    path: str  # relative to the repository root
    old: str
    new: str
    cases: tuple  # case ids whose failure kills it
    expect: tuple = ()  # the cases the CI sample expects to fail (a subset of ``cases``)

    @property
    def keyword(self) -> str:
        """The ``-k`` expression selecting its cases."""
        return " or ".join(self.cases)

    def check(self, text: str) -> None:
        """Raise ``MutantError`` unless ``old`` occurs exactly once in ``text``."""
        n = text.count(self.old)
        if n != 1:
            raise MutantError(f"mutant {self.name}: the text to replace occurs {n} times in {self.path} "
                              f"(expected exactly once; the code changed under the catalog?):\n{self.old!r}")

    def mutate(self, text: str) -> str:
        self.check(text)
        return text.replace(self.old, self.new, 1)


CATEGORIES = ("durability", "resume index", "pairing and mismatch", "retry budget", "preemption",
              "rank and node layout", "elastic", "orphan clean-up", "retention", "data", "hangs", "result")

CONTROLLER = "trainkit/backends/ray/controller.py"
SUPERVISOR = "trainkit/backends/ray/supervisor.py"
WORKER_GROUP = "trainkit/backends/ray/worker_group.py"
CAPACITY = "trainkit/backends/ray/capacity.py"
DECIDE = "trainkit/backends/decide.py"
BARRIER = "trainkit/backends/barrier.py"
LEDGER = "trainkit/ledger.py"
POLICIES = "trainkit/policies.py"
RESULT = "trainkit/result.py"
PLAN = "trainkit/data/plan.py"
SHARD = "trainkit/data/shard.py"
HANG = "trainkit/diagnostics/hang.py"

M = Mutant
MUTANTS: tuple = (
    # -- durability ------------------------------------------------------------------------------
    M("report-before-commit", "durability", "report() returns only once its round is committed", CONTROLLER,
      "            run.ledger.commit(*args, **kw)\n",
      "            asyncio.get_running_loop().call_later(1.0, lambda: run.ledger.commit(*args, **kw))\n",
      ("RESULT-001", "DUR-002", "REPORT-006")),
    M("manifest-not-written", "durability", "the commit point is the manifest write", LEDGER,
      "        self._write()\n        for e in retention.delete:", "        for e in retention.delete:",
      ("DUR-101",)),
    M("resume-from-oldest", "durability", "a restart resumes from the latest committed checkpoint", SUPERVISOR,
      'start = {"dir": run.ledger.state["latest_checkpoint"],',
      'start = {"dir": (run.ledger.state["checkpoints"] or [{}])[0].get("dir"),',
      ("FAIL-005", "PERSIST-002")),
    # -- resume index -----------------------------------------------------------------------------
    M("resume-index-plus-one", "resume index", "the first report after a resume from k is k+1", SUPERVISOR,
      '"index": run.ledger.latest_index}', '"index": run.ledger.latest_index + 1}',
      ("PERSIST-101", "PERSIST-002", "DUR-002")),
    M("resume-index-minus-one", "resume index", "the first report after a resume from k is k+1", SUPERVISOR,
      '"index": run.ledger.latest_index}', '"index": run.ledger.latest_index - 1}',
      ("PERSIST-003", "PERSIST-101", "FAIL-005"), expect=("PERSIST-003",)),
    # -- pairing and mismatch ---------------------------------------------------------------------
    M("report-pairs-with-barrier", "pairing and mismatch", "a report never pairs with a barrier", BARRIER,
      "        elif rnd.key != key:\n", "        elif rnd.key[1] != key[1]:\n",
      ("REPORT-004", "REPORT-104")),
    M("late-report-accepted", "pairing and mismatch",
      "a rank calling report() after another returned fails the run at once", CONTROLLER,
      "            if attempt.finished:\n", "            if len(attempt.finished) == attempt.world_size:\n",
      ("REPORT-102",)),
    M("mismatch-retryable", "pairing and mismatch", "a report mismatch is never retried", DECIDE,
      "    retryable = not mismatch and storage is None", "    retryable = storage is None",
      ("REPORT-103",)),
    # -- retry budget and retryability ------------------------------------------------------------
    M("one-extra-retry", "retry budget", "max_failures=n allows exactly n restarts", DECIDE,
      "decide_failure(budget.failures,", "decide_failure(budget.failures - 1,",
      ("FAIL-002", "FAIL-003"), expect=("FAIL-002", "FAIL-003")),
    M("one-fewer-retry", "retry budget", "max_failures=n allows exactly n restarts", DECIDE,
      "decide_failure(budget.failures,", "decide_failure(budget.failures + 1,",
      ("FAIL-003", "FAIL-007")),
    M("death-not-retried", "retry budget", "a dead worker is retried while failures are left", DECIDE,
      "    retryable = not mismatch and storage is None",
      '    retryable = not mismatch and failures[0].kind != "died" and storage is None',
      ("DUR-001", "DUR-003")),
    # -- preemption ------------------------------------------------------------------------------
    M("preemption-counted-as-failure", "preemption", "a preemption does not count against max_failures",
      DECIDE, '    preemption = any(f.kind == "preempted" for f in failures)\n',
      "    preemption = False\n", ("PREEMPT-001",)),
    M("max-preemptions-ignored", "preemption", "preemptions are bounded by max_preemptions", DECIDE,
      "max_preemptions=failure_config.max_preemptions)", "max_preemptions=-1)",
      ("PREEMPT-101",)),
    # -- rank and node layout --------------------------------------------------------------------
    M("context-rank-reversed", "rank and node layout", "the context's world rank is torch's rank", SUPERVISOR,
      'info = {"world_rank": r, ', 'info = {"world_rank": attempt.world_size - 1 - r, ',
      ("CTX-003", "CTX-001")),
    M("node-grouping-dropped", "rank and node layout", "ranks are consecutive within a node", WORKER_GROUP,
      "    ranks = [b for node in order for b, n in enumerate(node_ids) if n == node]\n",
      "    ranks = list(range(len(node_ids)))\n", ("CTX-101",)),
    M("local-rank-is-bundle-index", "rank and node layout", "local_rank counts from 0 on each node",
      WORKER_GROUP, '"local_rank": per_node[n].index(b)', '"local_rank": b', ("CTX-101",)),
    M("node-rank-always-zero", "rank and node layout", "node_rank numbers the group's nodes", WORKER_GROUP,
      '"node_rank": order.index(n)}', '"node_rank": 0}', ("CTX-101",)),
    # -- elastic ---------------------------------------------------------------------------------
    M("elastic-never-grows", "elastic", "an elastic group grows back when capacity returns", DECIDE,
      "target = decide_resize(world_size, grow_ready,", "target = decide_resize(world_size, 0,",
      ("ELASTIC-101",)),
    M("elastic-one-short", "elastic", "an elastic group starts (and restarts) with as many workers as fit",
      CAPACITY, "decision = decide_group_size(fitting, ", "decision = decide_group_size(fitting - 1, ",
      ("ELASTIC-001",)),
    M("elastic-minimum-unchecked", "elastic", "a minimum the cluster can never hold fails fast", CAPACITY,
      "if count_fitting_workers(total, per_worker) < sc.min_workers:",
      "if count_fitting_workers(total, per_worker) < 1:", ("ELASTIC-002",)),
    # -- orphan clean-up -------------------------------------------------------------------------
    M("default-orphans-kept", "orphan clean-up", "uncommitted checkpoint_<k> folders are removed at a restart",
      LEDGER, "            if d in known or (attempted and CHECKPOINT_NAME.fullmatch(d)):\n",
      "            if d in known:\n", ("DUR-102",)),
    M("clean-up-skipped", "orphan clean-up", "an attempt starts by removing uncommitted folders", LEDGER,
      "        self.clean_uncommitted()\n        self._drop_lineage_after",
      "        self._drop_lineage_after", ("DUR-102",)),
    # -- retention -------------------------------------------------------------------------------
    M("num-to-keep-plus-one", "retention", "num_to_keep=n keeps n checkpoints (and the latest)", POLICIES,
      "ranked[-num_to_keep:]", "ranked[-(num_to_keep + 1):]", ("CKPT-003", "CKPT-005"),
      expect=("CKPT-003", "CKPT-005")),
    M("score-order-reversed", "retention", "checkpoint_score_order 'max' keeps the highest scores", POLICIES,
      'return float(v) if order == "max" else -float(v)', 'return -float(v) if order == "max" else float(v)',
      ("CKPT-004", "CKPT-005")),
    M("latest-not-kept", "retention", "the latest checkpoint is always kept", POLICIES,
      "keep_ids = {id(e) for e in best} | {id(latest)}", "keep_ids = {id(e) for e in best}",
      ("CKPT-004",)),
    # -- data sharding and resume ----------------------------------------------------------------
    M("shard-overlap", "data", "ranks' shards are disjoint", PLAN,
      "    return start, start + base + (1 if rank < extra else 0)\n", "    return start, start + base + 1\n",
      ("DATA-001", "DATA-003")),
    M("consumed-count-off", "data", "a shard's state counts exactly the rows handed out", SHARD,
      "                p.consumed += rows  #", "                p.consumed += rows + 1  #",
      ("DATA-101",)),
    # -- hangs ---------------------------------------------------------------------------------
    M("hang-timeout-ignored", "hangs", "HangConfig.timeout_s starts the hang monitor", HANG,
      "    if hc is None or not hc.timeout_s:\n", "    if hc is None or hc.timeout_s:\n",
      ("HANG-003", "HANG-001")),
    M("returned-while-waiting-unchecked", "hangs",
      "a rank returning while others wait in report() ends the run at once", SUPERVISOR,
      "        if rnd is not None and rnd.arrivals:  #", "        if rnd is not None and not rnd.arrivals:  #",
      ("REPORT-101", "REPORT-003")),
    # -- the report round's result ---------------------------------------------------------------
    M("barrier-releases-early", "result", "report() is a barrier over every rank", BARRIER,
      "        if len(rnd.arrivals) < self.world_size:\n", "        if len(rnd.arrivals) < self.world_size - 1:\n",
      ("REPORT-001", "COLL-002")),
    M("metrics-from-last-rank", "result", "a round's metrics are rank 0's", BARRIER,
      "    return arrivals[0][0] or {}, d, files", "    return arrivals[max(arrivals)][0] or {}, d, files",
      ("REPORT-002",)),
    M("error-not-read-back", "result", "Result.from_path of a failed run has its error", RESULT,
      '    if error is None and state.get("error"):', '    if error is None and state.get("errors"):',
      ("PERSIST-005",)),
)

BY_NAME = {m.name: m for m in MUTANTS}
if len(BY_NAME) != len(MUTANTS):  # pragma: no cover - a catalog edit gone wrong
    raise MutantError("two mutants share a name")

# The CI sample: fast mutants (single-worker cases) whose killing cases are fixed.
SAMPLE = ("one-extra-retry", "num-to-keep-plus-one", "resume-index-minus-one")


def source_of(mutant: Mutant, root: str = ROOT) -> str:
    with open(os.path.join(root, mutant.path)) as f:
        return f.read()


def check_all(root: str = ROOT) -> list[str]:
    """Every mutant's problem against the tree at ``root`` (empty: all apply)."""
    problems = []
    for m in MUTANTS:
        try:
            m.check(source_of(m, root))
        except (MutantError, OSError) as e:
            problems.append(str(e))
    return problems
