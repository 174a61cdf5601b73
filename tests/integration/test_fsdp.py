"""FSDP2 on 2 CPU Ray workers (gloo): ``prepare_model(parallel_strategy="fsdp")`` and ``fully_shard``
called directly, sharded checkpoints from both ranks merged into one, resumed after a crash.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

import trainkit
from trainkit import Checkpoint, ConfigError, FailureConfig, RunConfig, ScalingConfig
from trainkit.torch import TorchTrainer, prepare_model
from trainkit.torch.fsdp import full_model_state_dict, load_sharded_state, save_sharded_state

pytestmark = pytest.mark.integration

STEPS, CRASH_AFTER = 4, 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 1))


def _checksum(model) -> float:
    sd = full_model_state_dict(model)  # a collective: every rank calls it, rank 0 gets the tensors
    return float(sum(v.double().sum() for v in sd.values())) if sd else 0.0


def train_func(config):
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    model = _model()
    if config["how"] == "prepare_model":
        model = prepare_model(model, parallel_strategy="fsdp",
                              parallel_strategy_kwargs={"layer_classes": (torch.nn.Linear,)})
    else:  # FSDP2 as the torch docs write it: one unit per layer, then the root
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    weight = model[2].weight
    facts = {"fsdp": isinstance(model, FSDPModule) and isinstance(model[2], FSDPModule),
             "dtensor": isinstance(weight, DTensor), "local_rows": weight.to_local().shape[0]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    start = 0
    checkpoint = trainkit.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_sharded_state(d, model, optimizer)
            with open(os.path.join(d, "meta.json")) as f:
                start = json.load(f)["step"]
        facts["resumed_checksum"] = _checksum(model)
        facts["resumed_at"] = start
    with open(os.path.join(config["folder"], f"facts-a{ctx.get_attempt()}-r{rank}.json"), "w") as f:
        json.dump(facts, f)

    g = torch.Generator().manual_seed(rank)
    for step in range(start + 1, STEPS + 1):
        if ctx.get_attempt() == 1 and step == CRASH_AFTER + 1:
            raise RuntimeError(f"crash before step {step}")
        x = torch.randn(8, 4, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        checksum = _checksum(model)
        with tempfile.TemporaryDirectory() as d:
            save_sharded_state(d, model, optimizer)  # every rank writes its own shards into its own folder
            if rank == 0:
                with open(os.path.join(d, "meta.json"), "w") as f:
                    json.dump({"step": step}, f)
            trainkit.report({"step": step, "loss": loss.item(), "checksum": checksum},
                            checkpoint=Checkpoint.from_directory(d))


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["prepare_model", "fully_shard"])
def test_fsdp2_trains_on_two_cpu_workers_and_resumes_from_the_merged_sharded_checkpoint(how, tmp_path, storage_path):
    folder = tmp_path / "facts"
    folder.mkdir()
    result = TorchTrainer(train_func, train_loop_config={"how": how, "folder": str(folder)},
                          scaling_config=ScalingConfig(num_workers=2),
                          run_config=RunConfig(name=f"fsdp-{how}", storage_path=storage_path,
                                               failure_config=FailureConfig(max_failures=1))).fit()
    assert result.error is None
    assert list(result.metrics_dataframe["step"]) == list(range(1, STEPS + 1))
    for rank in (0, 1):
        with open(folder / f"facts-a1-r{rank}.json") as f:
            facts = json.load(f)
        # Sharded, not replicated: each rank holds 4 of the 8 rows of the middle layer's weight.
        assert facts == {"fsdp": True, "dtensor": True, "local_rows": 4}
    with open(folder / "facts-a2-r0.json") as f:
        resumed = json.load(f)
    # Attempt 2 loaded the parameters of the report before the crash, both ranks' shards of them.
    assert resumed["resumed_at"] == CRASH_AFTER
    checksums = dict(zip(result.metrics_dataframe["step"], result.metrics_dataframe["checksum"]))
    assert resumed["resumed_checksum"] == pytest.approx(checksums[CRASH_AFTER], rel=1e-12)
    with result.checkpoint.as_directory() as d:
        assert sorted(os.listdir(d)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]


def _bad_strategy(config):
    prepare_model(torch.nn.Linear(2, 1), parallel_strategy="zero3")


def test_prepare_model_names_the_strategies_it_takes(storage_path):
    trainer = TorchTrainer(_bad_strategy, scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name="bad", storage_path=storage_path))
    with pytest.raises(trainkit.TrainingFailedError) as info:
        trainer.fit()
    text = f"{info.value} {info.value.__cause__}"
    assert "parallel_strategy" in text and "'fsdp2'" in text and "zero3" in text, text


def _one_rank_fsdp(config):
    model = prepare_model(torch.nn.Linear(2, 1), parallel_strategy="fsdp")
    trainkit.report({"type": type(model).__name__})


def test_prepare_model_with_fsdp_and_one_rank_returns_the_model_as_it_is(storage_path):
    result = TorchTrainer(_one_rank_fsdp, scaling_config=ScalingConfig(num_workers=0),
                          run_config=RunConfig(name="one", storage_path=storage_path)).fit()
    assert result.metrics["type"] == "Linear"


def test_fsdp1_options_on_cpu_are_refused_with_the_options_that_work():
    from trainkit.torch.fsdp import wrap_for_strategy

    with pytest.raises(ConfigError, match="sharding_strategy.*reshard_after_forward"):
        wrap_for_strategy(torch.nn.Linear(2, 1), "fsdp", torch.device("cpu"), {"sharding_strategy": "FULL_SHARD"})
