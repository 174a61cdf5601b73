"""DeepSpeed ZeRO-2 in a trainkit training function: 2 CPU ranks under ``torchrun --max-restarts=1``
(gloo), a crash on the first attempt, and a resume from the merged checkpoint (every rank's ZeRO
optimizer shard in one committed folder).

Runs only where ``deepspeed`` is installed: CI does not install it (a source distribution whose
first use on CPU compiles a small C++ op, about 35 s here; see docs/frameworks.md). Lightning's
``RayDeepSpeedStrategy`` needs CUDA (Lightning refuses a CPU accelerator) and is not tested here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SCRIPT = textwrap.dedent('''
    import os, sys, tempfile

    import torch

    import trainkit
    from trainkit import Checkpoint, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
                 "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


    def train_func(config):
        import deepspeed

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        # trainkit made the process group (gloo) already: DeepSpeed uses it.
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG,
                                               dist_init_required=False)
        start = 0
        checkpoint = trainkit.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                _, client = engine.load_checkpoint(d, tag="ds")
                start = client["step"]
        ctx = trainkit.get_context()
        g = torch.Generator().manual_seed(ctx.get_world_rank())
        for step in range(start + 1, 4):
            if ctx.get_attempt() == 1 and step == 3:
                raise RuntimeError("crash before step 3")
            x = torch.randn(4, 4, generator=g)
            loss = torch.nn.functional.mse_loss(engine(x), x.sum(1, keepdim=True))
            engine.backward(loss)
            engine.step()
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="ds", client_state={"step": step})  # every rank: its ZeRO shard
                trainkit.report({"step": step, "loss": loss.item(), "start": start},
                                checkpoint=Checkpoint.from_directory(d))


    if __name__ == "__main__":
        TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name="ds", storage_path=sys.argv[1])).fit()
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_zero2_on_two_cpu_ranks_resumes_from_every_ranks_shards(tmp_path):
    script = tmp_path / "ds_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), str(tmp_path / "storage")]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                          start_new_session=True) as popen:
        try:
            out, _ = popen.communicate(timeout=280)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    assert popen.returncode == 0, out[-4000:]
    from trainkit import Result

    result = Result.from_path(str(tmp_path / "storage" / "ds"))
    assert result.metrics_dataframe[["step", "start"]].values.tolist() == [[1, 0], [2, 0], [3, 2]]
    with result.checkpoint.as_directory() as d:
        assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(os.path.join(d, "ds")))
        assert open(os.path.join(d, "latest")).read().strip() == "ds"
