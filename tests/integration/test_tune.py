"""Ray Tune with trainkit, the Ray Train V2 way: a function trainable whose trial runs
``TorchTrainer(...).fit()`` (2 Ray workers) and reports the fit's result to Tune. Two trials.

Resources: a Tune trial reserves 1 CPU by default, which its own training workers then lack on a
small cluster. The trial only waits for its fit, so it asks for a sliver of one
(``tune.with_resources(fn, {"cpu": 0.01})``: Tune refuses a request of nothing at all), the
cluster has room for 3 ranks, and the trials run one at a time.
"""

from __future__ import annotations

import os
import sys

import pytest

tune = pytest.importorskip("ray.tune")

import torch  # noqa: E402

import trainkit  # noqa: E402
from trainkit import RunConfig, ScalingConfig  # noqa: E402
from trainkit.torch import TorchTrainer, prepare_model  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"), pytest.mark.trainkit(workers=3, nodes=1),
              pytest.mark.timeout(240)]

STEPS = 3


def train_func(config):
    torch.manual_seed(0)
    model = prepare_model(torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = x.sum(dim=1, keepdim=True)
    for step in range(1, STEPS + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trainkit.report({"step": step, "loss": loss.item(), "lr": config["lr"],
                         "world_size": trainkit.get_context().get_world_size()})


def trial(config):
    """One Tune trial: a whole trainkit fit, named after the trial so that a retried trial resumes it."""
    from ray import tune as ray_tune

    name = f"trial-{ray_tune.get_context().get_trial_id()}"
    # No clean-up here: a fit run inside a Ray actor releases its warm workers when it ends
    result = TorchTrainer(train_func, train_loop_config={"lr": config["lr"]},
                          scaling_config=ScalingConfig(num_workers=2),
                          run_config=RunConfig(name=name, storage_path=config["storage_path"])).fit()
    ray_tune.report({**result.metrics, "run_path": result.path})


@pytest.fixture
def by_value():
    """Tune pickles the trainable by reference; this test module is not importable in Ray's workers
    (a script's ``__main__`` is always pickled by value, so users need nothing like it)."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.usefixtures("by_value")
def test_two_tune_trials_each_run_a_two_worker_trainkit_fit(tmp_path, storage_path):
    from trainkit.backends.ray import release_warm_workers

    # Earlier tests' idle warm groups belong to this driver's controller, which the trials' own
    # controllers cannot reuse or release: free their CPUs for the trials' workers.
    release_warm_workers()
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.01}),
        param_space={"lr": tune.grid_search([0.001, 0.01]), "storage_path": storage_path},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="sweep", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    results = tuner.fit()
    assert results.num_errors == 0 and len(results) == 2
    by_lr = {r.config["lr"]: r.metrics for r in results}
    assert sorted(by_lr) == [0.001, 0.01]
    for lr, metrics in by_lr.items():
        assert metrics["lr"] == lr and metrics["step"] == STEPS and metrics["world_size"] == 2
        assert os.path.dirname(metrics["run_path"]) == storage_path
    assert by_lr[0.001]["run_path"] != by_lr[0.01]["run_path"]
    # The trials trained differently: the larger step size lowers the loss more in 3 steps.
    assert by_lr[0.01]["loss"] < by_lr[0.001]["loss"]
    best = results.get_best_result(metric="loss", mode="min")
    assert best.config["lr"] == 0.01
