"""Benchmark of issue 4: a user's test suite of training-loop tests, with the plugin and with Ray Train.

Writes three suites of ``--tests`` (default 20) tests into a temporary folder and runs
each with ``python -m pytest`` in a fresh process, timing the whole run (interpreter
start, imports, cluster start and shutdown included):

(a) ``plugin``: each test calls ``run_training(train_fn)`` -- a 2-worker fit with 5
    reports -- under ``--trainkit-workers=2`` (the fake cluster: 2 virtual nodes).
    Target: <= 60 s in total.
(b) ``local``: each test calls ``local_training(train_fn)`` (``num_workers=0``), 5
    reports. Target: <= 15 s in total.
(c) ``ray_train``: the same suite written against Ray Train 2.60: one ``ray.init``
    (4 CPUs, no dashboard, private RAY_TMPDIR) in a session fixture, each test calling
    ``ray.train.torch.TorchTrainer(...).fit()`` with 2 workers and 5 ``ray.train.report``
    calls. Information only.

    python benchmarks/bench_plugin.py [--tests 20] [--only plugin,local,ray_train] [--json OUT]

Prints a table; exits 0 when every target measured holds, 1 when one is missed, 2 on bad
arguments. ``--json OUT`` writes the figures to OUT (``-``: stdout). Run it on a quiet
machine: the suites are timed end to end and share the CPUs with whatever else runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys

from _common import write_json
import tempfile
import time

TARGETS_S = {"plugin": 60.0, "local": 15.0}

TRAIN_FN = '''
def train_fn(config):
    ctx = trainkit.get_context()
    for step in range(5):
        trainkit.report({"step": step, "world_size": ctx.get_world_size()})
'''

SUITES = {
    "plugin": ("import pytest\nimport trainkit\n" + TRAIN_FN + '''

@pytest.mark.parametrize("i", range(N))
def test_fit(run_training, i):
    result = run_training(train_fn)
    assert result.metrics == {"step": 4, "world_size": 2}
''', ["--trainkit-workers=2"]),
    "local": ("import pytest\nimport trainkit\n" + TRAIN_FN + '''

@pytest.mark.parametrize("i", range(N))
def test_fit(local_training, i):
    result = local_training(train_fn)
    assert result.metrics == {"step": 4, "world_size": 1}
''', []),
    "ray_train": ('''import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_session():
    tmp = tempfile.mkdtemp(prefix="tkb-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def train_fn(config):
    import ray.train

    ctx = ray.train.get_context()
    for step in range(5):
        ray.train.report({"step": step, "world_size": ctx.get_world_size()})


@pytest.mark.parametrize("i", range(N))
def test_fit(ray_session, tmp_path, i):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.error is None  # Ray Train 2.60 keeps only checkpointed metrics in distributed mode
''', []),
}


def run_suite(kind: str, n_tests: int, workdir: str) -> dict:
    """Run one suite in a fresh pytest process; its wall time and outcome."""
    source, args = SUITES[kind]
    folder = os.path.join(workdir, kind)
    os.makedirs(folder)
    with open(os.path.join(folder, f"test_{kind}_suite.py"), "w") as f:
        f.write(source.replace("range(N)", f"range({n_tests})"))
    with open(os.path.join(folder, "pytest.ini"), "w") as f:
        f.write("[pytest]\n")  # this folder is the rootdir: no project conftest or ini applies
    env = dict(os.environ, TRAINKIT_PROGRESS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, folder]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    passed = re.search(r"(\d+) passed", tail[0])
    return {"suite": kind, "tests": n_tests, "wall_s": round(wall_s, 2), "per_test_s": round(wall_s / n_tests, 3),
            "passed": int(passed.group(1)) if passed else 0, "exit_code": proc.returncode,
            "target_s": TARGETS_S.get(kind), "summary": tail[0],
            "output_tail": "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=20, help="tests per suite (default 20)")
    parser.add_argument("--only", default="plugin,local,ray_train", help="comma-separated suites to run")
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(kinds) - set(SUITES)
    if unknown or args.tests < 1:
        print(f"error: --only takes {', '.join(SUITES)} (got {sorted(unknown)}); --tests must be >= 1",
              file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tk_bench_plugin_") as workdir:
        for kind in kinds:
            rows.append(run_suite(kind, args.tests, workdir))
    ok = all(r["exit_code"] == 0 and (r["target_s"] is None or r["wall_s"] <= r["target_s"]) for r in rows)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": load},
              "suites": rows, "ok": ok}
    if args.json == "-":
        write_json(report, "-")
        return 0 if ok else 1
    print(f"load average at start: {load:.1f}; {os.cpu_count()} CPUs")
    print(f"{'suite':<10} {'tests':>5} {'passed':>6} {'total s':>8} {'s/test':>7} {'target':>8}  verdict")
    for r in rows:
        target = f"<= {r['target_s']:.0f} s" if r["target_s"] else "-"
        verdict = ("FAILED RUN" if r["exit_code"] else
                   "ok" if r["target_s"] is None or r["wall_s"] <= r["target_s"] else "MISSED")
        print(f"{r['suite']:<10} {r['tests']:>5} {r['passed']:>6} {r['wall_s']:>8.1f} {r['per_test_s']:>7.2f} "
              f"{target:>8}  {verdict}")
        if r["exit_code"]:
            print(r["output_tail"], file=sys.stderr)
    write_json(report, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
