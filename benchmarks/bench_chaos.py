"""Time ``trainkit chaos scenarios/worker_crash.yaml`` end to end and print per-fault recovery times.

    python benchmarks/bench_chaos.py                      # 3 runs of worker_crash.yaml
    python benchmarks/bench_chaos.py --runs 5 scenarios/exception.yaml

Each run is a fresh ``trainkit chaos`` process (cluster start included, as a user sees it),
with ``--json`` for the verdict. Target for worker_crash: < 20 s on the 2-core dev box
when it is otherwise idle (other load inflates every figure: check ``uptime`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", nargs="?", default=os.path.join(ROOT, "scenarios", "worker_crash.yaml"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--target-s", type=float, default=20.0, help="median wall-clock target (exit 1 above it)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the figures as JSON to OUT (- for stdout)")
    a = p.parse_args()
    walls, recoveries, runs = [], [], []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "verdict.json")
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "trainkit.cli", "chaos", a.scenario, "--json", out,
                                   "--storage", os.path.join(tmp, "runs")], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode not in (0, 1) or not os.path.exists(out):
                print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
                return 1
            verdict = json.load(open(out))
        rec = [r["recovery_s"] for r in verdict.get("recoveries", []) if r.get("recovery_s") is not None]
        walls.append(wall)
        recoveries += rec
        runs.append({"wall_s": wall, "load_avg": load, "passed": verdict["passed"], "recovery_s": rec})
        print(f"run {i + 1}: {wall:6.1f} s wall (load avg {load:.1f}), passed={verdict['passed']}, "
              f"recovery per fault: {', '.join(f'{r:.2f} s' for r in rec) or '-'}")
    print(f"{os.path.basename(a.scenario)}: wall min {min(walls):.1f} s / median {statistics.median(walls):.1f} s "
          f"(n={len(walls)}); recovery min {min(recoveries, default=float('nan')):.2f} s / median "
          f"{statistics.median(recoveries) if recoveries else float('nan'):.2f} s")
    median = statistics.median(walls)
    ok = median < a.target_s and all(r["passed"] for r in runs)
    print(f"target: median wall < {a.target_s:.0f} s and every verdict passed -> {'OK' if ok else 'MISSED'}")
    write_json({"scenario": a.scenario, "runs": runs, "median_wall_s": median, "target_s": a.target_s, "ok": ok},
               a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
