"""The ``ray`` backend on a real local Ray: DDP, the durable report barrier, failures, resume, S3.

One Ray for the session (``ray_up`` in conftest.py: the plugin's cluster). Healthy 2-worker groups stay
warm between fits, so most tests reuse the same workers; tests that kill a group are
grouped together, and the 4-worker tests come last. After every test, the pids of every
attempt that ended in failure (from ``attempt_started`` events) must be gone; the pids of
a successful run's last attempt are the warm group, which the last test releases.

Training functions write what they saw into files under the test's ``tmp_path`` (all
processes run on this machine) so that every rank's view can be asserted, not only
rank 0's return value.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
import time

import pytest

import trainkit
from trainkit import (Checkpoint, ControllerError, FailureConfig, Result, RunConfig, ScalingConfig,
                      TrainingFailedError, WorkerGroupError)
from trainkit.events import read_run_dicts
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(150)]

FAST_S = 8.0  # "fails fast": seconds from the cause to fit() raising (the machine is small and shared)
DEAD_WITHIN_S = 20.0  # a killed group's processes must be gone within this


# -- helpers ------------------------------------------------------------------------------------
def _fit(fn, storage_path, name, *, workers=2, config=None, max_failures=0, **run_kwargs):
    return TorchTrainer(
        fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures), **run_kwargs),
    ).fit()


def _of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def _attempt_pids(events: list[dict]) -> dict[int, dict[int, int]]:
    """attempt -> {world rank: pid}, from the (last) attempt_started event of each attempt."""
    out: dict[int, dict[int, int]] = {}
    for e in _of_type(events, "attempt_started"):
        if e.get("ranks"):
            out[e["attempt"]] = {r["world_rank"]: r["pid"] for r in e["ranks"]}
    return out


def _wait_until(pred, timeout: float, interval: float = 0.05):
    """Poll ``pred`` until it is truthy or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = pred()
    return value


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running process (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _alive(pids) -> list[int]:
    return sorted(p for p in set(pids) if pid_alive(p))


def _assert_dead(pids, timeout: float = DEAD_WITHIN_S) -> None:
    pids = sorted(set(pids))
    _wait_until(lambda: not _alive(pids), timeout)
    left = _alive(pids)
    assert not left, f"worker processes still alive {timeout:.0f} s after their group ended: {left}"


_WARM_PIDS: set[int] = set()  # last attempts of successful runs: the warm groups


@pytest.fixture(autouse=True)
def _no_rank_worker_left(tmp_path):
    """After each test: every worker of a failed attempt is dead (the events list each attempt's pids).

    The workers of an attempt that finished are the warm group (kept for the next fit on
    purpose); they are remembered and must die in ``release_warm_workers()`` (last test).
    """
    yield
    must_be_dead: set[int] = set()
    warm: set[int] = set()
    for events_file in glob.glob(str(tmp_path / "**" / "events.jsonl"), recursive=True):
        events = read_run_dicts(os.path.dirname(events_file))
        failed = {e["attempt"] for e in _of_type(events, "worker_failed")}
        for attempt, ranks in _attempt_pids(events).items():
            (must_be_dead if attempt in failed else warm).update(ranks.values())
    must_be_dead -= warm  # a healthy rank of a failed attempt is kept for the next one
    _WARM_PIDS.update(warm)
    _WARM_PIDS.difference_update(must_be_dead)
    _assert_dead(must_be_dead)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _report_step(step: int, *, files: dict | None = None, **metrics) -> None:
    """report({"step": step, ...}) with a checkpoint holding ``files`` (name -> JSON), or none."""
    if not files:
        trainkit.report({"step": step, **metrics})
        return
    with tempfile.TemporaryDirectory() as d:
        for name, obj in files.items():
            with open(os.path.join(d, name), "w") as f:
                json.dump(obj, f)
        trainkit.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(d))


def _checkpoint_json(ckpt: Checkpoint | None, name: str = "step.json"):
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        with open(os.path.join(d, name)) as f:
            return json.load(f)


def _steps_fn(config):
    """Resumable loop: ``steps`` reports, checkpoint files per ``ckpt_ranks``, faults per ``config``.

    Records on every rank, per attempt, what it resumed from; returns rank 0's view.
    """
    ctx = trainkit.get_context()
    rank, attempt = ctx.get_world_rank(), ctx.get_attempt()
    start_ckpt = _checkpoint_json(trainkit.get_checkpoint())
    start = start_ckpt["step"] if start_ckpt else 0
    seen = {"start": start, "report_index": ctx.get_report_index(), "attempt": attempt, "pid": os.getpid()}
    _write_json(os.path.join(config["out"], f"attempt-{attempt}", f"rank-{rank}.json"), seen)
    for step in range(start + 1, config["steps"] + 1):
        files = None
        if rank in config.get("ckpt_ranks", (0,)):
            files = {f"rank-{rank}.json": {"step": step, "rank": rank}}
            if rank == 0:
                files["step.json"] = {"step": step}
        _report_step(step, files=files, attempt=attempt)
        fault = config.get("fault")
        if fault and attempt == fault["attempt"] and rank == fault["rank"] and step == fault["after_report"]:
            _write_json(os.path.join(config["out"], "fault.json"), {"time": time.time(), "pid": os.getpid()})
            if fault["how"] == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                os._exit(1)
    return seen


# -- 1. DDP on the Ray docs' CNN loop -----------------------------------------------------------
N_SAMPLES = 1000


def _digits():
    """The same 1000 noisy 8x8 images of ten class templates on every rank (seeded)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(10, 1, 8, 8, generator=g)
    labels = torch.arange(N_SAMPLES) % 10
    images = templates[labels] + 0.3 * torch.randn(N_SAMPLES, 1, 8, 8, generator=g)
    return images, labels


def _cnn_train_func(config):
    """The Ray docs' PyTorch getting-started loop (ray.train -> trainkit) on a tiny CNN and generated
    8x8 "digits" (ten noisy templates; sklearn's import alone costs seconds per worker):
    prepare_model, prepare_data_loader, set_epoch, report per epoch with a checkpoint of
    ``model.module.state_dict()`` (rank 0 writes it: file names must differ per rank)."""
    import torch
    from torch.nn import CrossEntropyLoss
    from torch.optim import Adam
    from torch.utils.data import DataLoader, TensorDataset

    import trainkit.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    model = trainkit.torch.prepare_model(model)
    criterion = CrossEntropyLoss()
    optimizer = Adam(model.parameters(), lr=0.01)

    data = TensorDataset(*_digits())
    train_loader = DataLoader(data, batch_size=64, shuffle=True)
    train_loader = trainkit.torch.prepare_data_loader(train_loader)

    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    epoch_losses = []
    samples = 0
    for epoch in range(config["epochs"]):
        if ctx.get_world_size() > 1:
            train_loader.sampler.set_epoch(epoch)
        total, n = 0.0, 0
        for images, labels in train_loader:
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            n += len(labels)
        samples += n
        epoch_losses.append(total / n)
        metrics = {"loss": loss.item(), "epoch": epoch, "epoch_loss": total / n, "rank": rank}
        with tempfile.TemporaryDirectory() as temp_checkpoint_dir:
            checkpoint = None
            # the getting-started guide saves on every rank; the DDP guide on rank 0 only: both work
            if rank == 0 or config.get("save_on_every_rank"):
                torch.save(model.module.state_dict(), os.path.join(temp_checkpoint_dir, "model.pt"))
                checkpoint = Checkpoint.from_directory(temp_checkpoint_dir)
            trainkit.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            print(metrics)
    param_sum = float(sum(p.detach().double().sum() for p in model.parameters()))
    _write_json(os.path.join(config["out"], f"rank-{rank}.json"), {
        "world_size": ctx.get_world_size(), "world_rank": rank, "local_rank": ctx.get_local_rank(),
        "has_module": hasattr(model, "module"), "model_type": type(model).__name__,
        "sampler": type(train_loader.sampler).__name__, "samples_per_epoch": samples // config["epochs"],
        "dist_world_size": torch.distributed.get_world_size(), "dist_rank": torch.distributed.get_rank(),
        "dist_backend": torch.distributed.get_backend(), "param_sum": param_sum, "epoch_losses": epoch_losses,
        "pid": os.getpid()})
    return {"rank": rank, "param_sum": param_sum}


def _check_cnn_run(result, out: str, run_path: str, workers: int, epochs: int) -> None:
    import torch

    seen = [_read_json(os.path.join(out, f"rank-{r}.json")) for r in range(workers)]
    assert [s["world_rank"] for s in seen] == list(range(workers))
    assert [s["dist_rank"] for s in seen] == list(range(workers))
    assert {s["world_size"] for s in seen} == {s["dist_world_size"] for s in seen} == {workers}
    assert {s["dist_backend"] for s in seen} == {"gloo"}
    assert all(s["has_module"] and s["model_type"] == "DistributedDataParallel" for s in seen)
    assert {s["sampler"] for s in seen} == {"DistributedSampler"}
    assert [s["samples_per_epoch"] for s in seen] == [N_SAMPLES // workers] * workers, "each rank gets its shard"
    assert len({round(s["param_sum"], 6) for s in seen}) == 1, "DDP kept replicas in sync"
    assert len({s["pid"] for s in seen}) == workers
    assert seen[0]["epoch_losses"][-1] < seen[0]["epoch_losses"][0], "the model learns"

    assert result.error is None
    assert result.return_value["rank"] == 0
    assert result.metrics["rank"] == 0 and result.metrics["epoch"] == epochs - 1
    df = result.metrics_dataframe
    assert list(df["epoch"]) == list(range(epochs)) and set(df["rank"]) == {0}
    ckpts = sorted(d for d in os.listdir(run_path) if d.startswith("checkpoint_"))
    assert ckpts == [f"checkpoint_{i}" for i in range(1, epochs + 1)]
    assert result.checkpoint.path == os.path.join(run_path, f"checkpoint_{epochs}")
    with result.checkpoint.as_directory() as d:
        assert os.listdir(d) == ["model.pt"]
        state = torch.load(os.path.join(d, "model.pt"))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    model.load_state_dict(state)  # saved from model.module: no "module." prefix
    assert abs(sum(float(p.detach().double().sum()) for p in model.parameters()) - seen[0]["param_sum"]) < 1e-6
    committed = _of_type(read_run_dicts(run_path), "report_committed")
    assert [e["index"] for e in committed] == list(range(1, epochs + 1))
    assert {e["world_size"] for e in committed} == {workers}
    with open(os.path.join(run_path, "logs", "attempt-1", "rank-0.log")) as f:
        log0 = f.read()
    assert f"'epoch': {epochs - 1}" in log0 and "'rank': 0" in log0
    assert os.path.exists(os.path.join(run_path, "logs", "attempt-1", f"rank-{workers - 1}.log"))


def test_two_workers_train_the_docs_cnn_with_gloo_ddp(storage_path, tmp_path):
    out = str(tmp_path / "seen")
    result = _fit(_cnn_train_func, storage_path, "cnn2", config={"epochs": 2, "out": out})
    _check_cnn_run(result, out, os.path.join(storage_path, "cnn2"), workers=2, epochs=2)


# -- 10. collectives and the context ------------------------------------------------------------
def _collective_fn(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    got = trainkit.collective.broadcast_from_rank_zero({"from": rank, "pid": os.getpid()})
    marker = os.path.join(config["out"], "rank-1-before-barrier")
    if rank == 1:
        _write_json(marker, {"t": time.time()})
    trainkit.collective.barrier()
    after_barrier = os.path.exists(marker)  # rank 1 wrote it before entering the barrier
    second = trainkit.collective.broadcast_from_rank_zero(f"second-{rank}")
    trainkit.report({"rank": rank})
    _write_json(os.path.join(config["out"], f"rank-{rank}.json"), {
        "broadcast": got, "second": second, "after_barrier": after_barrier,
        "world_rank": rank, "world_size": ctx.get_world_size(), "local_rank": ctx.get_local_rank(),
        "local_world_size": ctx.get_local_world_size(), "node_rank": ctx.get_node_rank(),
        "experiment_name": ctx.get_experiment_name(), "attempt": ctx.get_attempt(),
        "report_index": ctx.get_report_index(), "run_path": ctx.get_storage().run_path, "pid": os.getpid()})
    return rank


@pytest.mark.parametrize("channel", ["tcp", "ray"])  # rounds over the report channel, or as actor calls
def test_collectives_and_context_values_are_consistent_across_two_ranks(storage_path, tmp_path, monkeypatch,
                                                                          channel):
    monkeypatch.setenv("TRAINKIT_REPORT_CHANNEL", channel)
    out = str(tmp_path / "seen")
    result = _fit(_collective_fn, storage_path, "ctx-run", config={"out": out})
    seen = [_read_json(os.path.join(out, f"rank-{r}.json")) for r in range(2)]
    rank0_pid = seen[0]["pid"]
    for r, s in enumerate(seen):
        assert s["broadcast"] == {"from": 0, "pid": rank0_pid}
        assert s["second"] == "second-0"
        assert s["after_barrier"] is True
        assert (s["world_rank"], s["world_size"], s["local_rank"], s["local_world_size"], s["node_rank"]) == \
            (r, 2, r, 2, 0)
        assert s["experiment_name"] == "ctx-run"
        assert s["attempt"] == 1 and s["report_index"] == 1
        assert s["run_path"] == os.path.join(storage_path, "ctx-run")
    assert result.return_value == 0
    started = _of_type(read_run_dicts(os.path.join(storage_path, "ctx-run")), "attempt_started")[-1]
    assert {r["world_rank"]: r["pid"] for r in started["ranks"]} == {0: seen[0]["pid"], 1: seen[1]["pid"]}
    for r in range(2):  # the channel was used, not left for actor calls
        with open(os.path.join(storage_path, "ctx-run", "logs", "attempt-1", f"rank-{r}.log")) as f:
            assert "using actor calls" not in f.read()


# -- 6. resume by name --------------------------------------------------------------------------
def test_a_second_fit_with_the_same_name_resumes_from_the_latest_checkpoint(storage_path, tmp_path):
    out1, out2 = str(tmp_path / "fit1"), str(tmp_path / "fit2")
    first = _fit(_steps_fn, storage_path, "resumed", config={"steps": 3, "out": out1})
    assert first.metrics["step"] == 3
    assert first.checkpoint.path.endswith("checkpoint_3")

    second = _fit(_steps_fn, storage_path, "resumed", config={"steps": 5, "out": out2})
    (attempt_dir,) = glob.glob(os.path.join(out2, "attempt-*"))
    for r in range(2):
        seen = _read_json(os.path.join(attempt_dir, f"rank-{r}.json"))
        assert seen["start"] == 3, "get_checkpoint() is the first run's latest checkpoint"
        assert seen["report_index"] == 3, "report indices continue from the checkpoint"
    assert second.return_value["start"] == 3
    assert second.metrics["step"] == 5
    assert list(second.metrics_dataframe["step"]) == [1, 2, 3, 4, 5]
    assert second.checkpoint.path == os.path.join(storage_path, "resumed", "checkpoint_5")
    assert _checkpoint_json(second.checkpoint) == {"step": 5}
    events = read_run_dicts(os.path.join(storage_path, "resumed"))
    assert _of_type(events, "run_started")[-1]["resumed_from_index"] == 3
    second_commits = [e["index"] for e in _of_type(events, "report_committed")][3:]
    assert second_commits == [4, 5]
    assert sorted(d for d in os.listdir(os.path.join(storage_path, "resumed")) if d.startswith("checkpoint_")) == \
        [f"checkpoint_{i}" for i in range(1, 6)]
    assert Result.from_path(os.path.join(storage_path, "resumed")).metrics["step"] == 5


# -- 7. checkpoints on moto-served S3 -----------------------------------------------------------
def test_checkpoints_from_both_ranks_are_merged_on_moto_s3(s3_storage, tmp_path):
    bucket = s3_storage.bucket  # on the moto server whose endpoint every Ray process of the cluster has
    out = str(tmp_path / "seen")
    result = _fit(_steps_fn, s3_storage.path, "s3run", config={"steps": 2, "out": out, "ckpt_ranks": [0, 1]})
    assert result.metrics["step"] == 2
    assert result.path == f"{bucket}/runs/s3run"

    fs = s3_storage.fs
    for i in (1, 2):
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/s3run/checkpoint_{i}"))
        assert names == ["rank-0.json", "rank-1.json", "step.json"]
    events = [json.loads(line) for line in fs.cat_file(f"{bucket}/runs/s3run/events.jsonl").decode().splitlines()]
    assert [e["index"] for e in _of_type(events, "report_committed")] == [1, 2]
    assert _of_type(events, "run_finished")[-1]["status"] == "finished"
    _WARM_PIDS.update(_attempt_pids(events)[1].values())
    # each rank's log is uploaded when its run ends
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/s3run/logs/attempt-1")) == \
        ["rank-0.log", "rank-1.log"]

    loaded = Result.from_path(f"s3://{bucket}/runs/s3run")
    assert loaded.error is None
    assert loaded.metrics["step"] == 2
    assert list(loaded.metrics_dataframe["step"]) == [1, 2]
    assert loaded.checkpoint.path.rstrip("/").endswith("s3run/checkpoint_2")
    with loaded.checkpoint.as_directory() as d:
        assert sorted(os.listdir(d)) == ["rank-0.json", "rank-1.json", "step.json"]
        with open(os.path.join(d, "rank-1.json")) as f:
            assert json.load(f) == {"step": 2, "rank": 1}


# -- 9. an unsatisfiable resource request -------------------------------------------------------
@pytest.mark.parametrize("scaling", [
    ScalingConfig(num_workers=64),
    ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "fancy_chip": 1}),
], ids=["64-workers-on-4-cpus", "a-resource-no-node-has"])
def test_a_resource_request_the_cluster_can_never_satisfy_fails_fast(storage_path, scaling):
    def fn():
        trainkit.report({"x": 1})

    trainer = TorchTrainer(fn, scaling_config=scaling, run_config=RunConfig(name="too-big",
                                                                            storage_path=storage_path))
    t0 = time.monotonic()
    with pytest.raises(ControllerError) as info:
        trainer.fit()
    assert time.monotonic() - t0 < FAST_S
    msg = str(info.value)
    assert "never" in msg and ("CPU" in msg if scaling.num_workers == 64 else "fancy_chip" in msg)
    assert str(scaling.num_workers) in msg
    loaded = Result.from_path(os.path.join(storage_path, "too-big"))
    assert isinstance(loaded.error, ControllerError), "Result.from_path shows the run's error"
    assert _of_type(read_run_dicts(os.path.join(storage_path, "too-big")), "attempt_started") == []


# -- 2. SIGKILL of a rank at a chosen report ----------------------------------------------------
def test_a_rank_sigkilled_after_report_k_restarts_from_checkpoint_k(storage_path, tmp_path):
    k, steps = 2, 4
    out = str(tmp_path / "seen")
    run_path = os.path.join(storage_path, "sigkill")
    result = _fit(_steps_fn, storage_path, "sigkill", max_failures=1, config={
        "steps": steps, "out": out, "ckpt_ranks": [0, 1],
        "fault": {"attempt": 1, "rank": 1, "after_report": k, "how": "sigkill"}})
    assert result.error is None
    assert result.return_value == {"start": k, "report_index": k, "attempt": 2,
                                   "pid": result.return_value["pid"]}
    for r in range(2):
        assert _read_json(os.path.join(out, "attempt-2", f"rank-{r}.json"))["start"] == k
    assert result.metrics == {"step": steps, "attempt": 2}
    assert list(result.metrics_dataframe["step"]) == list(range(1, steps + 1))
    assert list(result.metrics_dataframe["attempt"]) == [1] * k + [2] * (steps - k)
    assert result.attempts == 2

    events = read_run_dicts(run_path)
    pids = _attempt_pids(events)
    killed = _read_json(os.path.join(out, "fault.json"))["pid"]
    assert killed == pids[1][1]
    (failed,) = _of_type(events, "worker_failed")
    assert failed["attempt"] == 1 and failed["will_retry"] is True
    root = failed["failures"][0]
    assert root["world_rank"] == 1 and root["kind"] == "died" and root["pid"] == killed
    assert _of_type(events, "attempt_started")[-1]["start_index"] == k
    (restarted,) = _of_type(events, "group_restarted")
    assert restarted["from_index"] == k
    commits = [(e["attempt"], e["index"]) for e in _of_type(events, "report_committed")]
    assert commits == [(1, i) for i in range(1, k + 1)] + [(2, i) for i in range(k + 1, steps + 1)]
    with result.checkpoint.as_directory() as d:
        assert sorted(os.listdir(d)) == ["rank-0.json", "rank-1.json", "step.json"]
    _assert_dead([killed])
    # rank 0 was waiting in the barrier: released, it keeps its process; only rank 1 is started afresh
    assert pids[2][0] == pids[1][0] and pids[2][1] != killed


# -- 5. the durability race ---------------------------------------------------------------------
def test_checkpoint_k_survives_a_rank_that_exits_right_after_its_own_report_k(storage_path, tmp_path):
    """Rank 0 reports a checkpoint at k; rank 1 reports k with none and exits at once when report()
    returns. A committed checkpoint is never lost: the restart resumes from k, not k - 1."""
    k = 3
    out = str(tmp_path / "seen")
    run_path = os.path.join(storage_path, "race")
    result = _fit(_steps_fn, storage_path, "race", max_failures=1, config={
        "steps": k + 1, "out": out, "ckpt_ranks": [0],
        "fault": {"attempt": 1, "rank": 1, "after_report": k, "how": "exit"}})
    for r in range(2):
        seen = _read_json(os.path.join(out, "attempt-2", f"rank-{r}.json"))
        assert seen["start"] == k and seen["report_index"] == k
    assert result.metrics["step"] == k + 1
    assert list(result.metrics_dataframe["step"]) == list(range(1, k + 2))
    events = read_run_dicts(run_path)
    (failed,) = _of_type(events, "worker_failed")
    assert failed["failures"][0]["world_rank"] == 1 and failed["failures"][0]["kind"] == "died"
    assert _of_type(events, "attempt_started")[-1]["start_index"] == k
    committed_k = [e for e in _of_type(events, "report_committed") if e["index"] == k]
    assert committed_k[0]["attempt"] == 1 and committed_k[0]["checkpoint"] == f"checkpoint_{k}"


# -- 8. mismatched reports fail fast ------------------------------------------------------------
def _fewer_reports_fn(config):
    rank = trainkit.get_context().get_world_rank()
    n = 3 if rank == 0 else 2
    for i in range(n):
        trainkit.report({"i": i})
    if rank == 1:
        _write_json(os.path.join(config["out"], "returned.json"), {"time": time.time()})
    return n


def test_a_rank_that_reports_one_time_fewer_fails_the_run_fast_naming_the_ranks(storage_path, tmp_path):
    out = str(tmp_path / "seen")
    with pytest.raises(WorkerGroupError) as info:
        _fit(_fewer_reports_fn, storage_path, "fewer", config={"out": out}, max_failures=2)
    took = time.time() - _read_json(os.path.join(out, "returned.json"))["time"]
    assert took < FAST_S, f"the mismatch took {took:.1f} s to end the run"
    msg = str(info.value)
    assert "report" in msg and "rank 1" in msg and "rank 0" in msg
    assert "2 report(s)" in msg, "names the returning rank's report count"
    assert [f.kind for f in info.value.failures][0] == "mismatch"
    events = read_run_dicts(os.path.join(storage_path, "fewer"))
    assert len(_of_type(events, "attempt_started")) == 1, "a mismatch is not retried"
    assert [e["index"] for e in _of_type(events, "report_committed")] == [1, 2]


def _report_vs_barrier_fn(config):
    rank = trainkit.get_context().get_world_rank()
    _write_json(os.path.join(config["out"], f"rank-{rank}.json"), {"time": time.time()})
    if rank == 0:
        trainkit.report({"x": 1})
    else:
        trainkit.collective.barrier()
    return "unreachable"


def test_report_on_one_rank_never_pairs_with_barrier_on_another(storage_path, tmp_path):
    out = str(tmp_path / "seen")
    with pytest.raises(WorkerGroupError) as info:
        _fit(_report_vs_barrier_fn, storage_path, "report-vs-barrier", config={"out": out})
    started = max(_read_json(os.path.join(out, f"rank-{r}.json"))["time"] for r in range(2))
    assert time.time() - started < FAST_S
    msg = str(info.value)
    assert "report" in msg and "barrier" in msg
    assert "rank 0" in msg and "rank 1" in msg
    events = read_run_dicts(os.path.join(storage_path, "report-vs-barrier"))
    assert _of_type(events, "report_committed") == [], "the report was not committed by a barrier"


# -- 3. an exception on one rank ----------------------------------------------------------------
def _raise_on_rank_1_fn(config):
    import torch.distributed as dist

    rank = trainkit.get_context().get_world_rank()
    trainkit.report({"step": 1})
    if rank == 1:
        _write_json(os.path.join(config["out"], "raised.json"), {"time": time.time()})
        raise ValueError("rank one cannot go on: bad batch 17")
    dist.barrier()  # blocks forever (gloo timeout 30 min) unless the controller tears it down
    return "unreachable"


def test_an_exception_on_one_rank_tears_the_others_down_at_once(storage_path, tmp_path):
    out = str(tmp_path / "seen")
    run_path = os.path.join(storage_path, "raises")
    with pytest.raises(WorkerGroupError) as info:
        _fit(_raise_on_rank_1_fn, storage_path, "raises", config={"out": out})
    took = time.time() - _read_json(os.path.join(out, "raised.json"))["time"]
    assert took < FAST_S, f"the other rank was left blocked for {took:.1f} s"
    err = info.value
    root = err.failures[0]
    assert root.world_rank == 1 and root.exc_type == "ValueError" and root.kind == "exception"
    assert root.message == "rank one cannot go on: bad batch 17"
    assert "_raise_on_rank_1_fn" in root.traceback and 'raise ValueError("rank one' in root.traceback
    pids = _attempt_pids(read_run_dicts(run_path))[1]
    assert root.pid == pids[1] and root.node_id
    assert "rank 1" in str(err) and "ValueError: rank one cannot go on" in str(err)
    _assert_dead(pids.values(), timeout=FAST_S)  # rank 0 (blocked in a gloo barrier) is gone too
    loaded = Result.from_path(run_path)
    assert type(loaded.error) is WorkerGroupError
    assert loaded.error.failures[0].to_dict() == root.to_dict()


# -- 4. max_failures exhausted ------------------------------------------------------------------
def _always_raises_fn(config):
    ctx = trainkit.get_context()
    _write_json(os.path.join(config["out"], f"attempt-{ctx.get_attempt()}-rank-{ctx.get_world_rank()}.json"),
                {"pid": os.getpid()})
    if ctx.get_world_rank() == 1:
        raise RuntimeError(f"always fails (attempt {ctx.get_attempt()})")
    trainkit.collective.barrier()  # rank 0 waits for rank 1, which never arrives
    return "unreachable"


def test_max_failures_exhausted_raises_worker_group_error_after_three_attempts(storage_path, tmp_path):
    out = str(tmp_path / "seen")
    run_path = os.path.join(storage_path, "exhausted")
    with pytest.raises(WorkerGroupError) as info:
        _fit(_always_raises_fn, storage_path, "exhausted", max_failures=2, config={"out": out})
    # rank 1 writes its file and raises, every attempt (rank 0 may be torn down before it starts)
    assert sorted(f for f in os.listdir(out) if f.endswith("rank-1.json")) == \
        [f"attempt-{a}-rank-1.json" for a in (1, 2, 3)]
    assert {f.split("-rank-")[0] for f in os.listdir(out)} == {"attempt-1", "attempt-2", "attempt-3"}
    err = info.value
    assert isinstance(err, TrainingFailedError)
    assert err.failures[0].world_rank == 1 and err.failures[0].exc_type == "RuntimeError"
    assert "always fails (attempt 3)" in err.failures[0].message
    assert "max_failures=2" in str(err)
    loaded = Result.from_path(run_path)
    assert type(loaded.error) is WorkerGroupError
    assert [f.to_dict() for f in loaded.error.failures] == [f.to_dict() for f in err.failures]
    assert loaded.attempts == 3
    events = read_run_dicts(run_path)
    assert [e["will_retry"] for e in _of_type(events, "worker_failed")] == [True, True, False]
    assert _of_type(events, "run_finished")[-1]["status"] == "failed"
    pids = _attempt_pids(events)
    # ranks whose run() returned keep their (healthy) process for the next attempt: no fresh worker start
    assert sorted(pids) == [1, 2, 3] and all(sorted(a) == [0, 1] for a in pids.values())


# -- 1b. four workers (a new group shape: last, so the 2-worker group is reused above) ----------
def test_four_workers_train_the_docs_cnn_with_gloo_ddp(storage_path, tmp_path):
    out = str(tmp_path / "seen")
    result = _fit(_cnn_train_func, storage_path, "cnn4", workers=4,
                  config={"epochs": 2, "out": out, "save_on_every_rank": True})
    _check_cnn_run(result, out, os.path.join(storage_path, "cnn4"), workers=4, epochs=2)


# -- 11. warm groups are released ---------------------------------------------------------------
def test_release_warm_workers_leaves_no_rank_worker_alive(storage_path, tmp_path):
    from trainkit.backends.ray import release_warm_workers

    out = str(tmp_path / "seen")
    result = _fit(_steps_fn, storage_path, "warm", workers=4, config={"steps": 1, "out": out})
    pids = _attempt_pids(read_run_dicts(os.path.join(storage_path, "warm")))[1]
    assert result.metrics["step"] == 1
    assert _alive(pids.values()) == sorted(pids.values()), "a successful fit keeps its group warm"
    release_warm_workers()
    _assert_dead(set(pids.values()) | _WARM_PIDS)
    _WARM_PIDS.clear()
    # the controller lives on: its next run reports over a new channel, not actor calls
    _fit(_steps_fn, storage_path, "after-release", config={"steps": 1, "out": str(tmp_path / "after")})
    for r in range(2):
        with open(os.path.join(storage_path, "after-release", "logs", "attempt-1", f"rank-{r}.log")) as f:
            assert "using actor calls" not in f.read()
    release_warm_workers()
