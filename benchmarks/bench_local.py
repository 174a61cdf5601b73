"""Local-mode benchmarks of issue 2: fit() overhead and checkpoint commit cost.

(a) ``fit``: a local-mode ``TorchTrainer(...).fit()`` whose function makes 5 metrics-only
    reports, timed after imports and after one warm-up fit (trainer construction
    included: that is where the function is validated). Target: median <= 50 ms.
(b) ``commit``: a local-mode ``report(checkpoint=...)`` of a 100 MB folder (10 files x
    10 MB of random bytes) into local storage, against ``shutil.copytree`` of the same
    folder on the same filesystem; alternating, one warm-up each, ``os.sync()`` before
    every timed call so that neither pays for the other's dirty pages.
    Target: median(commit) / median(copytree) <= 1.5 (the ratio of the minimums is
    shown too, as a check on noise).

    python benchmarks/bench_local.py [--json OUT] [--fits 20] [--commits 5] [--dir DIR]

Prints a table; exits 0 when every target holds, 1 when one is missed (2: bad arguments).
``--json OUT`` writes the figures to OUT (``-``: stdout). Runs in one process, no Ray.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import write_json

FIT_TARGET_S = 0.050
COMMIT_RATIO_TARGET = 1.5


def measure_import_s() -> float:
    """Seconds to import trainkit and trainkit.torch in a fresh interpreter (informative)."""
    code = ("import time; t = time.perf_counter(); import trainkit, trainkit.torch; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_fit(n_fits: int, base: str) -> dict:
    import trainkit
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    def train_func():
        for i in range(5):
            trainkit.report({"step": i, "loss": 1.0 / (i + 1)})

    storage = os.path.join(base, "fit_runs")
    os.makedirs(storage)

    def one_fit() -> float:
        t0 = time.perf_counter()
        result = TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=0),
                              run_config=RunConfig(storage_path=storage)).fit()
        elapsed = time.perf_counter() - t0
        assert result.error is None and result.metrics["step"] == 4 and len(result.metrics_dataframe) == 5
        return elapsed

    warmup = one_fit()
    times = [one_fit() for _ in range(n_fits)]
    median = statistics.median(times)
    return {"n": n_fits, "warmup_s": warmup, "median_s": median, "min_s": min(times), "max_s": max(times),
            "target_s": FIT_TARGET_S, "ok": median <= FIT_TARGET_S}


def make_checkpoint_folder(path: str, n_files: int, file_mb: int) -> int:
    os.makedirs(path)
    for i in range(n_files):
        with open(os.path.join(path, f"shard_{i:02d}.bin"), "wb") as f:
            f.write(os.urandom(file_mb * 1024 * 1024))
    return n_files * file_mb * 1024 * 1024


def bench_commit(n_commits: int, base: str, n_files: int, file_mb: int) -> dict:
    import trainkit
    from trainkit import Checkpoint, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    src = os.path.join(base, "checkpoint_src")
    nbytes = make_checkpoint_folder(src, n_files, file_mb)
    storage = os.path.join(base, "commit_runs")
    copies = os.path.join(base, "copies")
    os.makedirs(storage)
    os.makedirs(copies)

    def train_func(config):
        os.sync()
        t0 = time.perf_counter()
        trainkit.report({"step": 1}, checkpoint=Checkpoint.from_directory(config["src"]))
        return time.perf_counter() - t0

    def one_commit(k: int) -> float:
        name = f"commit_{k}"
        result = TorchTrainer(train_func, train_loop_config={"src": src},
                              scaling_config=ScalingConfig(num_workers=0),
                              run_config=RunConfig(name=name, storage_path=storage)).fit()
        committed = os.path.join(storage, name, "checkpoint_1")
        assert result.checkpoint is not None and os.path.samefile(result.checkpoint.path, committed)
        assert sum(os.path.getsize(os.path.join(committed, f)) for f in os.listdir(committed)) == nbytes
        shutil.rmtree(os.path.join(storage, name))
        return result.return_value

    def one_copytree(k: int) -> float:
        dst = os.path.join(copies, f"copy_{k}")
        os.sync()
        t0 = time.perf_counter()
        shutil.copytree(src, dst)
        elapsed = time.perf_counter() - t0
        shutil.rmtree(dst)
        return elapsed

    one_commit(0), one_copytree(0)  # warm-up: page cache, imports, first-run paths
    commit_s, copy_s = [], []
    for k in range(1, n_commits + 1):
        commit_s.append(one_commit(k))
        copy_s.append(one_copytree(k))
    ratio = statistics.median(commit_s) / statistics.median(copy_s)
    return {"n": n_commits, "bytes": nbytes, "files": n_files,
            "commit_median_s": statistics.median(commit_s), "commit_min_s": min(commit_s),
            "copytree_median_s": statistics.median(copy_s), "copytree_min_s": min(copy_s),
            "commit_s": commit_s, "copytree_s": copy_s,
            "ratio": ratio, "ratio_of_minimums": min(commit_s) / min(copy_s),
            "target_ratio": COMMIT_RATIO_TARGET, "ok": ratio <= COMMIT_RATIO_TARGET}


def machine() -> dict:
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews figures
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gib": mem_gib, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "load_average_1m": load}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fit, commit = report["fit"], report["commit"]
    ok = lambda b: "[green]ok[/green]" if b else "[red]MISSED[/red]"  # noqa: E731
    table = Table(title="trainkit local-mode benchmarks")
    for col in ("benchmark", "median", "min", "target", "status"):
        table.add_column(col)
    table.add_row("import trainkit.torch (new process)", f"{report['import_s'] * 1e3:.0f} ms",
                  "", "", "info")
    table.add_row(f"local fit, 5 reports (n={fit['n']})",
                  f"{fit['median_s'] * 1e3:.1f} ms", f"{fit['min_s'] * 1e3:.1f} ms",
                  f"<= {fit['target_s'] * 1e3:.0f} ms", ok(fit["ok"]))
    mb = commit["bytes"] / 2**20
    table.add_row(f"commit {mb:.0f} MB, {commit['files']} files (n={commit['n']})",
                  f"{commit['commit_median_s'] * 1e3:.0f} ms", f"{commit['commit_min_s'] * 1e3:.0f} ms", "", "")
    table.add_row(f"shutil.copytree {mb:.0f} MB (n={commit['n']})",
                  f"{commit['copytree_median_s'] * 1e3:.0f} ms", f"{commit['copytree_min_s'] * 1e3:.0f} ms", "", "")
    table.add_row("commit / copytree", f"{commit['ratio']:.2f}x", f"{commit['ratio_of_minimums']:.2f}x",
                  f"<= {commit['target_ratio']:.1f}x", ok(commit["ok"]))
    Console().print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="trainkit local-mode benchmarks (issue 2)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    p.add_argument("--fits", type=int, default=20, help="timed local fits (default 20)")
    p.add_argument("--commits", type=int, default=5, help="timed commits and copies, each (default 5)")
    p.add_argument("--files", type=int, default=10, help="files in the checkpoint (default 10)")
    p.add_argument("--file-mb", type=int, default=10, help="MB per checkpoint file (default 10)")
    p.add_argument("--dir", default=None, help="scratch folder on the filesystem to measure (default: a temp dir)")
    args = p.parse_args(argv)
    if args.fits < 1 or args.commits < 1 or args.files < 1 or args.file_mb < 1:
        p.error("--fits, --commits, --files and --file-mb must be >= 1")

    machine_info = machine()  # load average before the benchmark's own work
    import_s = measure_import_s()
    import trainkit.torch  # noqa: F401  (timed fits start after imports)

    base = tempfile.mkdtemp(prefix="trainkit_bench_", dir=args.dir)
    try:
        fit = bench_fit(args.fits, base)
        commit = bench_commit(args.commits, base, args.files, args.file_mb)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report = {"machine": machine_info, "import_s": import_s, "fit": fit, "commit": commit,
              "ok": fit["ok"] and commit["ok"]}
    if args.json != "-":
        print_table(report)
    write_json(report, args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
