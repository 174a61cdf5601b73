"""Cases: local mode (num_workers=0, in this process) and torchrun mode (local mode under torchrun).

For trainkit's backends local mode is trainkit's own; a backend that declares
``handles_local_mode`` (``ray_train``) runs its own local mode here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_files, checkpoint_with, count_attempt

_RT_LOCAL_STORAGE = ("Ray Train 2.60's local mode never reads or writes storage: Result.path, best_checkpoints "
                     "and metrics_dataframe are None and the checkpoint is the in-memory object (reference §12).")


# -- local mode ------------------------------------------------------------------------------------
def _where(config):
    ctx = trainkit.get_context()
    return {"pid": os.getpid(), "world_size": ctx.get_world_size(), "rank": ctx.get_world_rank()}


@case("LOCAL-001", "local", "num_workers=0 runs the training function in the calling process with world size 1 "
      "and rank 0.")
def test_local_mode_runs_in_process(tk):
    assert tk.fit(_where, workers=0).return_value == {"pid": os.getpid(), "world_size": 1, "rank": 0}


def _metrics_only_local(config):
    trainkit.report({"loss": 0.5})


@case("LOCAL-002", "local", "In local mode a metrics-only report() gives Result.metrics equal to those metrics.")
def test_local_mode_result_metrics(tk):
    assert tk.fit(_metrics_only_local, workers=0).metrics == {"loss": 0.5}


def _local_checkpoint(config):
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({"step": 1}))
    trainkit.report({"step": 2})
    return checkpoint_files(trainkit.get_checkpoint())


@case("LOCAL-003", "local", "In local mode checkpoints are committed to storage like in distributed mode: "
      "Result.path is the run folder and a metrics-only report keeps the checkpoint.", extension=True,
      ray_train=_RT_LOCAL_STORAGE,
      ray_train_match=r"get_checkpoint\(\) after a metrics-only report|Result.path is None")
def test_local_mode_persists_checkpoints(tk):
    result = tk.fit(_local_checkpoint, workers=0, name="localrun")
    assert result.return_value == {"step": 1}, f"get_checkpoint() after a metrics-only report: {result.return_value}"
    assert os.path.normpath(str(result.path)) == os.path.normpath(tk.run_path("localrun")), \
        f"local mode's Result.path is {result.path}"
    assert checkpoint_files(result.checkpoint) == {"step": 1}
    assert os.path.normpath(result.checkpoint.path).startswith(os.path.normpath(tk.run_path("localrun")))


def _local_raises(config):
    raise KeyError("boom")


@case("LOCAL-004", "local", "In local mode a failing function makes fit() raise TrainingFailedError, as in "
      "distributed mode.", extension=True,
      ray_train="Ray Train 2.60's local mode lets the training function's own exception (e.g. KeyError) "
      "propagate unchanged (reference §12).", ray_train_raises=KeyError, ray_train_match="boom")
def test_local_mode_failure_is_training_failed_error(tk):
    err = tk.fails(_local_raises, workers=0)
    assert "boom" in str(err)


def _local_flaky(config):
    if count_attempt(config["dir"], 0) < 2:
        raise RuntimeError("first attempt fails")
    return "second attempt"


@case("LOCAL-005", "local", "In local mode FailureConfig.max_failures re-runs the function in process.",
      extension=True, ray_train="Ray Train 2.60's local mode ignores FailureConfig: no retries; the first "
      "attempt's exception propagates from fit() (reference §12).", ray_train_raises=RuntimeError,
      ray_train_match="first attempt fails")
def test_local_mode_retries(tk):
    assert tk.fit(_local_flaky, workers=0, config={"dir": tk.dir}, max_failures=1).return_value == "second attempt"


def _local_collectives(config):
    return {"barrier": trainkit.collective.barrier(), "bcast": trainkit.collective.broadcast_from_rank_zero(7)}


@case("LOCAL-006", "local", "In local mode barrier() returns None and broadcast_from_rank_zero(x) returns x.")
def test_local_mode_collectives(tk):
    assert tk.fit(_local_collectives, workers=0).return_value == {"barrier": None, "bcast": 7}


# -- torchrun mode --------------------------------------------------------------------------------
_SCRIPT = textwrap.dedent('''
    import os, sys
    import trainkit
    from conformance.harness import Harness, checkpoint_files, checkpoint_with, put, resolve_backend

    backend_name, base, out = sys.argv[1:4]

    def fn(config):
        import torch.distributed as dist
        ctx = trainkit.get_context()
        rank = ctx.get_world_rank()
        got = trainkit.collective.broadcast_from_rank_zero({"from": rank})
        trainkit.report({"step": 1, "rank": rank}, checkpoint=checkpoint_with({f"rank{rank}": rank}))
        put(out, f"rank{rank}.json", {
            "world_size": ctx.get_world_size(), "rank": rank, "env_rank": int(os.environ["RANK"]),
            "dist": dist.get_backend() if dist.is_initialized() else None, "bcast": got,
            "ckpt": checkpoint_files(trainkit.get_checkpoint())})

    h = Harness(backend_name, resolve_backend(backend_name), base)
    result = h.fit(fn, workers=0, name="torchrun-run")
    put(out, "result{}.json".format(os.environ["RANK"]),
        {"metrics": result.metrics, "ckpt": checkpoint_files(result.checkpoint),
         "path": str(result.path) if result.path else None})
''')


@pytest.fixture(scope="module")
def torchrun_out(conformance_backend, tmp_path_factory):
    """Run a 2-process torchrun job once for this module; per-rank records and the launcher's output."""
    name, _ = conformance_backend
    base = tmp_path_factory.mktemp("torchrun")
    out = base / "out"
    out.mkdir()
    script = base / "job.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAINKIT_PROGRESS="0")
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Own session, so that a timeout ends the ranks too, not only the launcher.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             "--master-addr=127.0.0.1", f"--master-port={port}", str(script), name, str(base),
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log = f"torchrun timed out after 180 s\n{log}"
    records = {}
    for n in sorted(os.listdir(out)):
        with open(out / n) as f:
            records[n[:-5]] = json.load(f)
    return {"rc": proc.returncode, "log": (log or "")[-3000:], "records": records,
            "run": str(base / "storage" / "torchrun-run")}


def _ranks(out) -> list:
    got = [out["records"].get(f"rank{r}") for r in (0, 1)]
    assert all(got), f"torchrun job did not record both ranks (exit {out['rc']}):\n{out['log']}"
    return got


@case("TORCHRUN-001", "torchrun", "Under torchrun with 2 processes, local mode gives each process world size 2, "
      "its own rank, and an initialised gloo process group.")
def test_torchrun_ranks(tk, torchrun_out):
    for r, rec in enumerate(_ranks(torchrun_out)):
        assert (rec["world_size"], rec["rank"], rec["env_rank"], rec["dist"]) == (2, r, r, "gloo"), rec


@case("TORCHRUN-002", "torchrun", "Under torchrun, broadcast_from_rank_zero returns rank 0's value in every "
      "process.", extension=True,
      ray_train="Ray Train 2.60's local mode makes collectives no-ops even under torchrun: rank 1's "
      "broadcast_from_rank_zero returns its own value (reference §12, W13, E6).",
      ray_train_match=r"broadcasts returned \[\{'from': 0\}, \{'from': 1\}\]")
def test_torchrun_broadcast(tk, torchrun_out):
    got = [rec["bcast"] for rec in _ranks(torchrun_out)]
    assert got == [{"from": 0}, {"from": 0}], f"the ranks' broadcasts returned {got}"


@case("TORCHRUN-003", "torchrun", "Under torchrun, report() commits one checkpoint holding every process's files "
      "in the run folder, seen by get_checkpoint() in every process and in the Result.", extension=True,
      ray_train=_RT_LOCAL_STORAGE, ray_train_match=r"get_checkpoint\(\) after report\(\) held")
def test_torchrun_report_commits_one_checkpoint(tk, torchrun_out):
    ranks = _ranks(torchrun_out)
    both = {"rank0": 0, "rank1": 1}
    got = [rec["ckpt"] for rec in ranks]
    assert got == [both, both], f"get_checkpoint() after report() held {got} in the two processes"
    res = torchrun_out["records"].get("result0")
    assert res and res["ckpt"] == both and res["metrics"]["rank"] == 0, res
    assert os.path.normpath(res["path"]) == os.path.normpath(torchrun_out["run"])
    assert torchrun_out["rc"] == 0, torchrun_out["log"]
