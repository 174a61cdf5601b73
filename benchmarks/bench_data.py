"""Data ingestion: trainkit shards against plain Ray Data ``streaming_split``, in the same run (issue 8).

Usage::

    python benchmarks/bench_data.py [--json OUT] [--rows 400000] [--workers 4] [--batch-size 256]
                                    [--epochs 3] [--state-calls 2000]

What it measures, on one local Ray (private ``RAY_TMPDIR``, no dashboard):

* ``iter_torch_batches`` throughput of a ``--workers``-way split of one in-memory
  dataset (``ray.data.range`` plus a float feature column, materialised once): every
  rank is a warm actor iterating its part, the figure is rows/s of the whole epoch (slowest
  rank). Once through ``ds.streaming_split(n, equal=True)`` (what Ray Train does) and
  once through trainkit's ``DataShard`` (``prepare_datasets`` then ``make_shard``). Best
  epoch of ``--epochs``. Target: trainkit >= 0.8 x streaming_split.
* the cost of checkpointing the iterator state per report: ``it.state_dict()`` plus
  ``save_shard_state`` (JSON file into a folder) in the middle of an epoch, with and
  without a local shuffle buffer (and ``state_dict()`` + ``json.dumps`` alone). Target:
  mean < 5 ms per report.

Exit 0 when both targets hold, 1 when one is missed, 2 on bad arguments. On a shared
machine the throughput of both paths is inflated alike; compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from _common import write_json


def _dataset(rows: int):
    import numpy as np
    import ray

    def add_feature(batch):
        batch["x"] = batch["id"].astype(np.float32) * 0.5
        return batch

    return ray.data.range(rows, override_num_blocks=16).map_batches(add_feature).materialize()


def _make_reader():
    import ray

    @ray.remote(num_cpus=0)
    class Reader:
        def __init__(self):
            import torch  # noqa: F401 - warm

        def epoch_streaming(self, split, batch_size: int) -> tuple:
            t0 = time.perf_counter()
            n = 0
            for b in split.iter_torch_batches(batch_size=batch_size):
                n += int(b["id"].shape[0])
            return n, time.perf_counter() - t0

        def epoch_trainkit(self, source, rank: int, world: int, batch_size: int) -> tuple:
            from trainkit.data import make_shard

            shard = self.__dict__.setdefault("_shard", make_shard(source, rank, world, name="train"))
            t0 = time.perf_counter()
            n = 0
            for b in shard.iter_torch_batches(batch_size=batch_size, device="cpu"):
                n += int(b["id"].shape[0])
            return n, time.perf_counter() - t0

    return Reader


def _throughput(ds, workers: int, batch_size: int, epochs: int) -> dict:
    import ray

    from trainkit.data import prepare_datasets

    Reader = _make_reader()
    readers = [Reader.remote() for _ in range(workers)]
    ray.get([r.__ray_ready__.remote() for r in readers])
    rows = ds.count()
    out: dict = {"rows": rows, "workers": workers, "batch_size": batch_size}
    t0 = time.perf_counter()
    source = prepare_datasets({"train": ds})["train"]
    out["trainkit_prepare_s"] = round(time.perf_counter() - t0, 3)
    splits = ds.streaming_split(workers, equal=True)  # once, as Ray Train does; each pass is an epoch
    for name in ("streaming_split", "trainkit"):
        walls = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            if name == "streaming_split":
                res = ray.get([r.epoch_streaming.remote(s, batch_size) for r, s in zip(readers, splits)])
            else:
                res = ray.get([r.epoch_trainkit.remote(source, i, workers, batch_size)
                               for i, r in enumerate(readers)])
            walls.append(time.perf_counter() - t0)
            got = sum(n for n, _ in res)
        best = min(walls)
        out[name] = {"rows_per_s": round(got / best), "epoch_s": [round(w, 3) for w in walls], "rows": got}
    for r in readers:
        ray.kill(r)
    out["ratio"] = round(out["trainkit"]["rows_per_s"] / out["streaming_split"]["rows_per_s"], 3)
    return out


def _state_cost(calls: int) -> dict:
    from trainkit.data import make_shard, save_shard_state

    data = [{"id": i} for i in range(100_000)]
    out = {}
    folder = tempfile.mkdtemp(prefix="tk_bench_state_")
    try:
        for label, kw in (("plain", {}), ("shuffled", {"local_shuffle_buffer_size": 1024,
                                                       "local_shuffle_seed": 1})):
            shard = make_shard(data, 1, 4, name="train")
            it = shard.iter_batches(batch_size=4, prefetch_batches=0, **kw)
            gen = iter(it)
            times, in_memory = [], []
            for _ in range(calls):
                next(gen)
                t0 = time.perf_counter()
                json.dumps(it.state_dict())
                t1 = time.perf_counter()
                save_shard_state(folder, it.state_dict())
                t2 = time.perf_counter()
                in_memory.append((t1 - t0) * 1000)
                times.append((t2 - t1) * 1000)
            out[label] = {"mean_ms": round(statistics.fmean(times), 4),
                          "median_ms": round(statistics.median(times), 4),
                          "p99_ms": round(sorted(times)[int(0.99 * len(times)) - 1], 4),
                          "state_dict_json_mean_ms": round(statistics.fmean(in_memory), 4)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--state-calls", type=int, default=2000)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    ray_tmpdir = tempfile.mkdtemp(prefix="tkbd-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmpdir
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        ds = _dataset(args.rows)
        figures = {"throughput": _throughput(ds, args.workers, args.batch_size, args.epochs),
                   "state_checkpoint": _state_cost(args.state_calls)}
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    t = figures["throughput"]
    s = figures["state_checkpoint"]
    ok_tp = t["ratio"] >= 0.8
    ok_state = max(v["mean_ms"] for v in s.values()) < 5.0
    figures["targets"] = {"throughput_within_20pct": ok_tp, "state_under_5ms": ok_state}
    if args.json != "-":
        print(f"rows {t['rows']}, {t['workers']} workers, batch {t['batch_size']}")
        print(f"  streaming_split iter_torch_batches : {t['streaming_split']['rows_per_s']:>10} rows/s  "
              f"epochs {t['streaming_split']['epoch_s']}")
        print(f"  trainkit DataShard iter_torch_b.   : {t['trainkit']['rows_per_s']:>10} rows/s  "
              f"epochs {t['trainkit']['epoch_s']}  (prepare {t['trainkit_prepare_s']} s, once per fit)")
        print(f"  ratio {t['ratio']} (target >= 0.8): {'ok' if ok_tp else 'MISSED'}")
        for k, v in s.items():
            print(f"  state_dict + save_shard_state ({k}): mean {v['mean_ms']} ms, median {v['median_ms']} ms, "
                  f"p99 {v['p99_ms']} ms; state_dict + json.dumps alone {v['state_dict_json_mean_ms']} ms")
        print(f"  state checkpoint < 5 ms per report: {'ok' if ok_state else 'MISSED'}")
    write_json(figures, args.json)
    return 0 if ok_tp and ok_state else 1


if __name__ == "__main__":
    sys.exit(main())
