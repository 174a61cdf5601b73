"""The controller's straggler executor: sample a straggler's stacks and name it in the event stream.

When ``StragglerWatch`` (trainkit.diagnostics.stragglers) names a rank at a committed
report, the controller starts ``sample_straggler`` in the background (training goes on):
about ``StragglerConfig.sample_s`` seconds of py-spy dumps of that rank, taken on its node
(trainkit.diagnostics.stacks.on_node), every frame counted and classified; then one
``straggler_detected`` event and a one-line warning on the driver's stderr. It never takes
the run down: a sample that cannot be taken still names the rank, with the reason.

Runs in the controller actor.
"""

from __future__ import annotations

import logging
import sys

from trainkit import events as ev
from trainkit.errors import TrainkitError
from trainkit.diagnostics import stacks
from trainkit.diagnostics.stragglers import DESCRIPTIONS, Straggler, summarize_samples

logger = logging.getLogger("trainkit.stragglers")

TOP_FRAMES = 12  # frames kept in the event, the most sampled first


async def sample_straggler(run, attempt, straggler: Straggler) -> None:
    cfg = run.spec.run_config.straggler_config
    info = attempt.group.info(straggler.world_rank)
    node, pid = info.get("node_id", ""), info.get("pid")
    error, summary = "", summarize_samples([])
    try:
        if pid and cfg.sample_s > 0:
            got = await stacks.on_node(node, stacks.sample_local, int(pid), cfg.sample_s,
                                       timeout_s=cfg.sample_s + stacks.PYSPY_TIMEOUT_S + 5)
            summary, error = summarize_samples(got["texts"]), got["error"]
    except Exception as e:  # noqa: BLE001 - diagnostics never take the run down; the rank is still named
        error = f"{type(e).__name__}: {e}"
    event = ev.StragglerDetected(
        attempt=attempt.number, index=straggler.index, world_rank=straggler.world_rank, node_id=node,
        median_step_s=straggler.median_step_s, others_median_step_s=straggler.others_median_step_s,
        classification=summary["kind"], user_frame=summary["user_frame"], samples=summary["samples"],
        frames=dict(list(summary["frames"].items())[:TOP_FRAMES]), error=error)
    try:
        if run.ledger is not None:
            run.ledger.emit(event, flush=True)
    except TrainkitError as e:  # the storage refused it (full, taken over): the run says why elsewhere
        logger.warning("trainkit: could not record %s: %s", summary_line(event), e)
        return
    line = summary_line(event)
    logger.warning("trainkit: %s", line)
    print(f"trainkit: {line}", file=sys.stderr, flush=True)


def summary_line(e: ev.StragglerDetected) -> str:
    """``straggler: rank 1 takes 0.61 s per step, the others 0.02 s (30x); in user code at slow (t.py:9)``."""
    ratio = e.median_step_s / e.others_median_step_s if e.others_median_step_s > 0 else float("inf")
    where = DESCRIPTIONS.get(e.classification, e.classification)
    if e.user_frame:
        where += f" at {e.user_frame}"
    return (f"straggler: rank {e.world_rank} takes {e.median_step_s:.2f} s per step, the others "
            f"{e.others_median_step_s:.2f} s ({ratio:.0f}x) since report {e.index}; {where}")
