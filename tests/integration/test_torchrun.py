"""torchrun mode: a num_workers=0 script launched by ``torchrun --nproc-per-node=2`` on CPU (gloo).

Each scenario runs the script below once in a subprocess; the ranks print JSON lines
(prefixed ``TKJSON``) that the tests parse.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import textwrap
import time

import pytest

from trainkit_testing.torchrun import launch_env, run_process_group, torchrun_command

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile, time

    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import trainkit
    from trainkit import Checkpoint, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer, prepare_data_loader, prepare_model

    SKEW_S = 0.3


    def emit(**fields):
        fields["rank"] = int(os.environ["RANK"])
        sys.stdout.write("TKJSON " + json.dumps(fields) + "\\n")
        sys.stdout.flush()


    class Rank0Arrival:
        """A report hook: rank 0 marks that it is inside report(index), before it waits for the others."""

        def __init__(self, folder):
            self.folder = folder

        def worker_hook(self):
            return self

        def before_report(self, ctx, index, metrics):
            if ctx.get_world_rank() == 0:
                open(os.path.join(self.folder, f"rank0_in_report_{index}"), "w").close()

        def after_report(self, ctx, index, metrics):
            pass


    def wait_for(path, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(path)
            time.sleep(0.005)


    def loader_indices(loader):
        return [int(i) for (batch,) in loader for i in batch]


    def train_ok(config):
        ctx = trainkit.get_context()
        rank = ctx.get_world_rank()
        emit(kind="context", world_size=ctx.get_world_size(), world_rank=rank, local_rank=ctx.get_local_rank(),
             local_world_size=ctx.get_local_world_size(), name=ctx.get_experiment_name(),
             dist_world_size=torch.distributed.get_world_size())

        model = prepare_model(torch.nn.Linear(3, 1))
        x = torch.full((4, 3), float(rank + 1))
        model(x).sum().backward()
        emit(kind="model", type=type(model).__name__, module_type=type(model.module).__name__,
             grad=model.module.weight.grad.tolist())

        data = TensorDataset(torch.arange(10))
        for shuffle in (False, True):
            loader = prepare_data_loader(DataLoader(data, batch_size=2, shuffle=shuffle))
            sampler = loader.sampler
            epochs = []
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                epochs.append(loader_indices(loader))
            emit(kind="loader", shuffle_in=shuffle, sampler=type(sampler).__name__,
                 sampler_shuffle=getattr(sampler, "shuffle", None), epochs=epochs)

        for step in (1, 2, 3):
            if rank == 1:
                # Arrive SKEW_S after rank 0 entered report(): a report() that is no barrier would
                # return on rank 0 before rank 1's checkpoint file exists.
                wait_for(os.path.join(config["markers"], f"rank0_in_report_{step}"))
                time.sleep(SKEW_S)
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, f"rank{rank}.txt"), "w") as f:
                    f.write(str(step))
                trainkit.report({"step": step, "rank": rank}, checkpoint=Checkpoint.from_directory(d))
            ckpt = trainkit.get_checkpoint()
            with ckpt.as_directory() as cd:
                files = sorted(os.listdir(cd))
            emit(kind="after_report", step=step, checkpoint=os.path.basename(ckpt.path), files=files,
                 index=ctx.get_report_index())
        trainkit.report({"step": 4, "final": True})
        return rank


    def train_mismatch(config):
        rank = trainkit.get_context().get_world_rank()
        n = 3 if rank == 0 else 2
        for step in range(1, n + 1):
            trainkit.report({"step": step})
        emit(kind="returned", reports=n)


    def train_raise(config):
        rank = trainkit.get_context().get_world_rank()
        trainkit.report({"step": 1})
        if rank == 1:
            raise ValueError("rank 1 broke at step 2")
        trainkit.report({"step": 2})  # rank 0 waits here until its peer is gone


    def main():
        mode, storage, name = sys.argv[1:4]
        fn = {"ok": train_ok, "mismatch": train_mismatch, "raise": train_raise}[mode]
        markers = os.path.join(os.path.dirname(storage), "markers")
        os.makedirs(markers, exist_ok=True)
        trainer = TorchTrainer(fn, train_loop_config={"markers": markers},
                               scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(name=name, storage_path=storage,
                                                    callbacks=[Rank0Arrival(markers)]))
        t0 = time.monotonic()
        try:
            result = trainer.fit()
        except Exception as e:
            emit(kind="error", type=type(e).__name__, message=str(e), elapsed_s=time.monotonic() - t0)
            sys.exit(1)
        emit(kind="result", metrics=result.metrics, path=result.path, return_value=result.return_value,
             checkpoint=os.path.basename(result.checkpoint.path), error=None if result.error is None else str(result.error))


    if __name__ == "__main__":
        main()
''')


def _torchrun(tmp_path, mode: str, name: str, timeout_s: float = 120):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    storage = tmp_path / "storage"
    cmd = torchrun_command(str(script), mode, str(storage), name)
    t0 = time.monotonic()
    proc = run_process_group(cmd, cwd=tmp_path, env=launch_env(), timeout_s=timeout_s, stderr=subprocess.PIPE)
    elapsed = time.monotonic() - t0
    lines = [json.loads(line.split("TKJSON ", 1)[1]) for line in proc.stdout.splitlines() if "TKJSON " in line]
    return proc, lines, elapsed, storage / name


def _by(lines, kind):
    return [line for line in lines if line["kind"] == kind]


@pytest.fixture(scope="module")
def ok_run(tmp_path_factory):
    """One torchrun of the "ok" scenario, shared by the xdist workers of this pytest run.

    The first worker to take the lock runs it and leaves its output for the others
    (pytest-xdist's recipe for running a fixture once).
    """
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by all workers of this run
    shared = root / "torchrun_ok"
    done = shared / "lines.json"
    with FileLock(str(root / "torchrun_ok.lock")):
        if not done.exists():
            shared.mkdir(exist_ok=True)
            proc, lines, _elapsed, run_dir = _torchrun(shared, "ok", "tr_ok")
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            done.write_text(json.dumps({"lines": lines, "run_dir": str(run_dir)}))
        data = json.loads(done.read_text())
    return data["lines"], pathlib.Path(data["run_dir"])


def test_both_ranks_see_world_size_two_and_ranks_zero_and_one(ok_run):
    lines, _ = ok_run
    ctx = _by(lines, "context")
    assert sorted(c["world_rank"] for c in ctx) == [0, 1]
    assert all(c["world_size"] == 2 and c["dist_world_size"] == 2 for c in ctx)
    assert all(c["local_world_size"] == 2 for c in ctx)
    assert sorted(c["local_rank"] for c in ctx) == [0, 1]
    assert {c["name"] for c in ctx} == {"tr_ok"}


def test_report_is_a_barrier_so_every_rank_sees_every_ranks_checkpoint_files(ok_run):
    lines, run_dir = ok_run
    after = _by(lines, "after_report")
    assert len(after) == 6
    for a in after:
        assert a["checkpoint"] == f"checkpoint_{a['step']}"
        assert a["files"] == ["rank0.txt", "rank1.txt"]
        assert a["index"] == a["step"]
    from trainkit import events as ev

    read = ev.parse_events((run_dir / "events.jsonl").read_bytes())
    commits = [e for e in read.events if isinstance(e, ev.ReportCommitted)]
    assert [e.index for e in commits] == [1, 2, 3, 4]
    assert all(e.world_size == 2 for e in commits)
    # rank 1 arrives SKEW_S after rank 0 entered reports 1-3: rank 0 waited for it there
    assert all(e.barrier_s >= 0.29 for e in commits[:3]), [e.barrier_s for e in commits]


def test_each_reported_checkpoint_is_persisted_exactly_once_with_files_from_both_ranks(ok_run):
    _, run_dir = ok_run
    folders = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint"))
    assert folders == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    for i in (1, 2, 3):
        d = run_dir / f"checkpoint_{i}"
        assert sorted(os.listdir(d)) == ["rank0.txt", "rank1.txt"]
        assert (d / "rank0.txt").read_text() == str(i) and (d / "rank1.txt").read_text() == str(i)
    state = json.loads((run_dir / "run_state.json").read_text())
    assert [c["dir"] for c in state["checkpoints"]] == folders
    assert state["status"] == "finished"


def test_both_ranks_get_the_result_with_rank_zeros_last_metrics(ok_run):
    lines, run_dir = ok_run
    results = sorted(_by(lines, "result"), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["metrics"] == {"step": 4, "final": True}
        assert r["checkpoint"] == "checkpoint_3"
        assert r["error"] is None
        assert r["path"] == str(run_dir)
    assert [r["return_value"] for r in results] == [0, 1]


def test_prepare_model_wraps_in_ddp_with_module_and_averages_gradients(ok_run):
    lines, _ = ok_run
    models = _by(lines, "model")
    assert len(models) == 2
    assert all(m["type"] == "DistributedDataParallel" and m["module_type"] == "Linear" for m in models)
    # each rank's input is all (rank + 1): the averaged gradient is 4 * 1.5 on every weight, on both ranks
    assert models[0]["grad"] == models[1]["grad"] == [[6.0, 6.0, 6.0]]


def test_prepare_data_loader_adds_a_distributed_sampler_that_keeps_shuffle(ok_run):
    lines, _ = ok_run
    loaders = _by(lines, "loader")
    assert len(loaders) == 4
    for entry in loaders:
        assert entry["sampler"] == "DistributedSampler"
        assert entry["sampler_shuffle"] is entry["shuffle_in"]


@pytest.mark.parametrize("shuffle", [False, True])
def test_prepare_data_loader_gives_ranks_disjoint_indices_covering_the_data(ok_run, shuffle):
    lines, _ = ok_run
    per_rank = {e["rank"]: e["epochs"] for e in _by(lines, "loader") if e["shuffle_in"] is shuffle}
    assert sorted(per_rank) == [0, 1]
    for epoch in (0, 1):
        a, b = set(per_rank[0][epoch]), set(per_rank[1][epoch])
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch]) == 5
        assert not a & b
        assert a | b == set(range(10))
    if not shuffle:
        assert per_rank[0][0] == [0, 2, 4, 6, 8] and per_rank[1][0] == [1, 3, 5, 7, 9]
        assert per_rank[0][0] == per_rank[0][1]


def test_set_epoch_reshuffles_a_shuffling_loader(ok_run):
    lines, _ = ok_run
    shuffled = [e for e in _by(lines, "loader") if e["shuffle_in"]]
    assert any(e["epochs"][0] != e["epochs"][1] for e in shuffled)


def test_a_rank_that_reports_one_time_fewer_fails_fast_with_an_error_about_report(tmp_path):
    # Bounded by the subprocess timeout: a hang would raise TimeoutExpired here.
    proc, lines, _elapsed, run_dir = _torchrun(tmp_path, "mismatch", "tr_mismatch", timeout_s=120)
    assert proc.returncode != 0
    errors = _by(lines, "error")
    # Both ranks' fit() raise the mismatch. Rank 0's error is always seen; rank 1's is printed unless
    # torchrun's agent, seeing rank 0 exit with 1 first, SIGTERMed rank 1 before its script printed it.
    ranks = sorted(e["rank"] for e in errors)
    assert ranks == [0, 1] or (ranks == [0] and "SIGTERM" in proc.stderr), (ranks, proc.stderr[-5000:])
    # fit() itself ends at once, not after a collective timeout (gloo's default is 30 minutes)
    assert max(e["elapsed_s"] for e in errors) < 45
    for e in errors:
        assert e["type"] == "WorkerGroupError"  # a TrainingFailedError, as in every mode
        assert "report" in e["message"]
        assert "rank 0 is waiting at report 3" in e["message"]
        assert "rank 1 returned after 2 report(s)" in e["message"]
    returned = _by(lines, "returned")
    assert [r["reports"] for r in returned] == [2]  # only rank 1 got out of its loop
    from trainkit import Result

    restored = Result.from_path(str(run_dir))
    assert type(restored.error).__name__ == "WorkerGroupError"
    assert "rank 1 returned after 2 report(s)" in str(restored.error)
    assert restored.error.failures[0].kind == "mismatch"


def test_the_root_cause_under_torchrun_is_the_rank_that_raised_not_rank_zeros_broken_collective(tmp_path):
    proc, lines, _elapsed, run_dir = _torchrun(tmp_path, "raise", "tr_raise", timeout_s=120)
    assert proc.returncode != 0
    from trainkit import Result

    restored = Result.from_path(str(run_dir))
    assert restored.error is not None, proc.stderr[-3000:]
    root = restored.error.failures[0]
    assert (root.world_rank, root.exc_type) == (1, "ValueError"), restored.error.failures
    assert "rank 1 broke at step 2" in root.message and "rank 1 broke at step 2" in str(restored.error)
