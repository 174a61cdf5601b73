"""trainkit's distributed figures at a git revision and in the working tree, side by side, in one run.

For a change that must not change behaviour (issue 16: the controller split), the
figures of ``bench_distributed.py``'s trainkit half are measured for both trees on the
same machine, in the same run, alternating: round 1 BEFORE then AFTER, round 2 AFTER
then BEFORE, and so on, each in a fresh process with its own ``ray.init(num_cpus=4)``.
BEFORE is ``git archive REV`` unpacked into a temp dir and put first on ``PYTHONPATH``
(the Ray workers inherit it); AFTER is this checkout.

Figures per round: (a) cold fit and warm fit median (2 workers, 5 reports), (b) report()
median and p90 (200 reports), (c) SIGKILL of rank 1 -> first report of the restarted group.
The table shows each figure's median over the rounds for both trees and AFTER / BEFORE.
It is information, not a gate: it exits 0 once both trees ran, 1 if one failed to run,
2 on bad arguments.

    python benchmarks/bench_before_after.py REV [--rounds N] [--reports N] [--json OUT]

About 40 s a round per tree on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

FIGURES = (  # (key, label, unit scale, unit)
    ("cold_fit_s", "(a) first (cold) fit, 5 reports", 1, "s"),
    ("warm_fit_s", "(a) warm fit, 5 reports, median", 1, "s"),
    ("report_median_s", "(b) report() median", 1e3, "ms"),
    ("report_p90_s", "(b) report() p90", 1e3, "ms"),
    ("restart_s", "(c) SIGKILL -> first report of the restarted group", 1, "s"),
)


def one_round(reports: int, fits: int) -> dict:
    """In a child process: the trainkit half of bench_distributed, this interpreter's trainkit."""
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    import ray

    import trainkit
    from bench_distributed import Trainkit, bench_fit, bench_report, bench_restart

    base = tempfile.mkdtemp(prefix="trainkit_bench_ba_")
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        tk = Trainkit(base)
        fit = bench_fit(tk, fits)
        rep = bench_report(tk, reports)
        restart = bench_restart(tk)
        return {"trainkit": os.path.dirname(trainkit.__file__), "cold_fit_s": fit["first_s"],
                "warm_fit_s": fit["warm"]["median"], "report_median_s": rep["median"], "report_p90_s": rep["p90"],
                "restart_s": restart["restart_s"]}
    finally:
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def run_tree(label: str, pythonpath: str | None, reports: int, fits: int) -> dict | None:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        path = out.name
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--reports", str(reports),
                               "--fits", str(fits)], env=env, cwd=tempfile.gettempdir(), stdout=sys.stderr,
                              stderr=sys.stderr)
        if proc.returncode != 0:
            print(f"bench_before_after: the {label} tree failed (exit {proc.returncode})", file=sys.stderr)
            return None
        with open(path) as f:
            got = json.load(f)
        got["wall_s"] = time.perf_counter() - t0
        return got
    finally:
        os.unlink(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="trainkit's distributed figures before and after a change")
    p.add_argument("rev", nargs="?", help="the git revision to compare the working tree with (e.g. HEAD~1)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree (default 3)")
    p.add_argument("--reports", type=int, default=200, help="timed reports per round (default 200)")
    p.add_argument("--fits", type=int, default=3, help="warm fits per round (default 3)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    p.add_argument("--child", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, HERE)
        with open(args.child, "w") as f:
            json.dump(one_round(args.reports, args.fits), f)
        return 0
    if not args.rev:
        p.error("name the revision to compare with, e.g. HEAD~1")
    if args.rounds < 1 or args.reports < 1 or args.fits < 1:
        p.error("--rounds, --reports and --fits must be >= 1")
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", args.rev + "^{commit}"], capture_output=True,
                         text=True)
    if sha.returncode != 0:
        p.error(f"not a revision of {REPO}: {args.rev}")
    sha = sha.stdout.strip()
    before_dir = tempfile.mkdtemp(prefix="trainkit_before_")
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before_dir], input=archive, check=True)
        runs: dict[str, list] = {"before": [], "after": []}
        load = os.getloadavg()
        for i in range(args.rounds):
            order = (("before", before_dir), ("after", REPO)) if i % 2 == 0 else (("after", REPO), ("before", before_dir))
            for label, path in order:
                print(f"bench_before_after: round {i + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                got = run_tree(label, path, args.reports, args.fits)
                if got is None:
                    return 1
                runs[label].append(got)
    finally:
        shutil.rmtree(before_dir, ignore_errors=True)
    doc = {"before": sha, "rounds": args.rounds, "loadavg_at_start": load, "runs": runs, "median": {}}
    lines = [f"trainkit at {sha[:10]} (before) vs the working tree (after), {args.rounds} alternating round(s); "
             f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
             f"{'figure':<55} {'before':>12} {'after':>12} {'after/before':>13}"]
    for key, label, scale, unit in FIGURES:
        b = statistics.median(r[key] for r in runs["before"])
        a = statistics.median(r[key] for r in runs["after"])
        doc["median"][key] = {"before": b, "after": a}
        lines.append(f"{label:<55} {b * scale:>9.2f} {unit:<2} {a * scale:>9.2f} {unit:<2} {a / b:>12.2f}x")
    if args.json != "-":
        print("\n".join(lines))
    write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
