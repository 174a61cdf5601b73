"""Distributed benchmarks of issue 3: trainkit's ``ray`` backend against Ray Train 2.60, side by side.

One process, one ``ray.init(num_cpus=4, include_dashboard=False)`` (a new local cluster,
``address="local"``, so it never joins another cluster on the host) shared by both
systems; trainkit runs first, then its warm workers are released, then Ray Train runs.
Every fit uses a fresh run folder under a temp dir.

(a) ``fit``: a trivial 2-worker ``TorchTrainer`` fit with 5 metrics-only reports: one
    first (cold) fit, then N warm fits (``--fits``, default 3; Ray Train takes ~20 s a
    fit here). Target: trainkit's warm median < 3 s and >= 10x faster than Ray Train's.
(b) ``report``: median ``report()`` latency without a checkpoint, 2 workers, timed with
    ``time.perf_counter`` around each report on rank 0 and returned via
    ``Result.return_value``: 200 reports for trainkit, 20 for Ray Train (its default 2 s
    controller poll makes each report take ~2 s). Target: trainkit < 5 ms.
(c) ``restart``: 2 workers, ``FailureConfig(max_failures=1)``; on the first attempt rank 1
    writes ``time.time()`` and SIGKILLs itself right after report 3; the figure is the time
    from then until rank 0 of the restarted group returns from its first report. Target:
    trainkit < 3 s + one worker start, where "one worker start" is the time to create one
    fresh Ray actor whose ``__init__`` imports torch and ping it (median of ``--starts``).
    Ray Train runs with its defaults, and once more with
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1`` (set in the driver at fit time; Ray Train
    propagates it to its controller and workers) unless ``--no-ray-tuned``.
(d) ``spare`` (issue 17): the same kill with ``RunConfig(spare_workers=1)``: a hot spare (a
    worker started, placed and torch-imported in the background) takes the dead rank's place.
    Rank 1 kills itself only once the run's ``events.jsonl`` shows the spare ready (the steady
    state of a run longer than one worker start). Target: median <= 0.8 s. trainkit's kill
    figures, with and without the spare, are medians of ``--restarts`` fits (default 3), run
    alternately; Ray Train's is one fit.

    python benchmarks/bench_distributed.py [--quick] [--json OUT] [--fits N] [--reports N]
                                           [--ray-reports N] [--starts N] [--restarts N]
                                           [--no-ray-tuned] [--no-ray-train]

``--no-ray-train`` skips Ray Train (its columns stay, empty) for a quick look at trainkit's figures.

Needs Ray Train importable (``ray[train]==2.60.0``, a dependency of trainkit). Takes
about 6 minutes (``--quick``: about 4) on a 2-core machine, almost all of it Ray Train.
While it runs, everything Ray prints goes to stderr, so stdout holds only the table (or the
JSON). Prints a table; exits 0 when every target holds, 1 when one is missed (it prints which),
2 on bad arguments or a missing dependency. ``--json OUT`` writes the figures (``-``: stdout).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid

from _common import write_json
from trainkit.events import read_run_dicts

WORKERS = 2
FIT_REPORTS = 5
WARM_FIT_TARGET_S = 3.0
FIT_SPEEDUP_TARGET = 10.0
REPORT_TARGET_S = 0.005
RESTART_BASE_TARGET_S = 3.0
SPARE_TARGET_S = 0.8
# Ray Train 2.60's figures from docs/benchmarks.md (2026-11-23, load average 1.4), shown with --no-ray-train
RAY_TRAIN_RECORDED = {"warm_fit_s": 24.99, "report_s": 2.014, "restart_s": 8.14, "restart_tuned_s": 5.66}
KILL_AFTER_REPORT = 3
FAIL_FN_REPORTS = 5
RAY_TUNED_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


# -- training functions (module level: pickled by value to the workers) -----------------------------

def tk_fit_fn():
    import trainkit

    for i in range(FIT_REPORTS):
        trainkit.report({"step": i})


def rt_fit_fn():
    import ray.train

    for i in range(FIT_REPORTS):
        ray.train.report({"step": i})


def _timed_reports(report, rank: int, n: int):
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        report({"step": i})
        times.append(time.perf_counter() - t0)
    return times if rank == 0 else None


def tk_report_fn(config):
    import trainkit

    return _timed_reports(trainkit.report, trainkit.get_context().get_world_rank(), config["n"])


def rt_report_fn(config):
    import ray.train

    return _timed_reports(ray.train.report, ray.train.get_context().get_world_rank(), config["n"])


def _fail_loop(report, rank: int, first_attempt: bool, config: dict):
    """Rank 1 of the first attempt dies after report KILL_AFTER_REPORT; rank 0 of the next attempt
    records when its first report returns."""
    restarted_at = None
    for i in range(1, FAIL_FN_REPORTS + 1):
        report({"step": i})
        if not first_attempt and rank == 0 and restarted_at is None:
            restarted_at = time.time()
            with open(os.path.join(config["dir"], "first_report_after_restart"), "w") as f:
                f.write(repr(restarted_at))
        if first_attempt and rank == 1 and i == KILL_AFTER_REPORT:
            _wait_for_spare(config.get("events"))
            with open(os.path.join(config["dir"], "killed_at"), "w") as f:
                f.write(repr(time.time()))
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return {"first_attempt": first_attempt, "restarted_at": restarted_at}


def _wait_for_spare(events_path, timeout_s: float = 120.0) -> None:
    """Until the run's event stream shows a hot spare ready (no-op without ``events_path``)."""
    if not events_path:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(events_path) as f:
                if '"type": "spare_ready"' in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no spare_ready event in {events_path} within {timeout_s:.0f} s")


def tk_fail_fn(config):
    import trainkit

    ctx = trainkit.get_context()
    return _fail_loop(trainkit.report, ctx.get_world_rank(), ctx.get_attempt() == 1, config)


def rt_fail_fn(config):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    # Ray Train 2.60 has no attempt number: rank 1 writes "killed_at" just before it dies
    first_attempt = not os.path.exists(os.path.join(config["dir"], "killed_at"))
    return _fail_loop(ray.train.report, rank, first_attempt, config)


# -- helpers ------------------------------------------------------------------------------------

def _stats(xs: list) -> dict:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "p90": p90}


def _read_float(path: str) -> float:
    with open(path) as f:
        return float(f.read())


class _Env:
    """Set environment variables in the driver for a block, then restore them."""

    def __init__(self, env: dict):
        self.env, self.old = env, {}

    def __enter__(self):
        for k, v in self.env.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log(msg: str) -> None:
    print(f"[bench_distributed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the two systems behind one interface ---------------------------------------------------------

class System:
    name = ""

    def __init__(self, base: str):
        self.base = base

    def storage(self, label: str) -> tuple[str, str]:
        path = os.path.join(self.base, self.key)
        os.makedirs(path, exist_ok=True)
        return path, f"{label}_{uuid.uuid4().hex[:8]}"

    def fit(self, fn, config=None, max_failures=0, label="run", **kw):
        raise NotImplementedError


class Trainkit(System):
    name, key = "trainkit", "trainkit"

    def fit(self, fn, config=None, max_failures=0, label="run", spare_workers=0, name=None):
        import trainkit
        from trainkit.torch import TorchTrainer

        path, default_name = self.storage(label)
        result = TorchTrainer(fn, train_loop_config=config,
                              scaling_config=trainkit.ScalingConfig(num_workers=WORKERS),
                              run_config=trainkit.RunConfig(
                                  name=name or default_name, storage_path=path,
                                  failure_config=trainkit.FailureConfig(max_failures=max_failures),
                                  # only when asked: bench_before_after.py runs this against older trees
                                  **({"spare_workers": spare_workers} if spare_workers else {}))).fit()
        if result.error is not None:
            raise RuntimeError(f"trainkit fit failed: {result.error!r}")
        return result


class RayTrain(System):
    name, key = "Ray Train", "ray_train"

    def fit(self, fn, config=None, max_failures=0, label="run", **kw):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        path, name = self.storage(label)
        result = TorchTrainer(fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=WORKERS),
                              run_config=RunConfig(name=name, storage_path=path,
                                                   failure_config=FailureConfig(max_failures=max_failures))).fit()
        if result.error is not None:
            raise RuntimeError(f"Ray Train fit failed: {result.error!r}")
        return result


# -- the figures --------------------------------------------------------------------------------

def bench_fit(system: System, n_warm: int) -> dict:
    def one(label: str) -> float:
        t0 = time.perf_counter()
        system.fit(tk_fit_fn if isinstance(system, Trainkit) else rt_fit_fn, label=label)
        return time.perf_counter() - t0

    log(f"{system.name}: first fit")
    first = one("fit_first")
    warm = []
    for k in range(n_warm):
        log(f"{system.name}: warm fit {k + 1}/{n_warm}")
        warm.append(one(f"fit_warm{k}"))
    return {"first_s": first, "warm_s": warm, "warm": _stats(warm)}


def bench_report(system: System, n: int) -> dict:
    log(f"{system.name}: {n} reports")
    fn = tk_report_fn if isinstance(system, Trainkit) else rt_report_fn
    result = system.fit(fn, config={"n": n}, label="reports")
    times = result.return_value
    if not isinstance(times, list) or len(times) != n:
        raise RuntimeError(f"{system.name}: expected {n} report timings from rank 0, got {times!r}")
    return {"times_s": times, **_stats(times)}


def bench_restart(system: System, env: dict | None = None, spares: int = 0) -> dict:
    log(f"{system.name}: SIGKILL rank 1 after report {KILL_AFTER_REPORT}" + (f" with {env}" if env else "")
        + (f", spare_workers={spares}" if spares else ""))
    d = tempfile.mkdtemp(prefix="restart_", dir=system.base)
    fn = tk_fail_fn if isinstance(system, Trainkit) else rt_fail_fn
    config, kw = {"dir": d}, {}
    if spares:
        path, name = system.storage("spare")
        config["events"] = os.path.join(path, name, "events.jsonl")
        kw = {"spare_workers": spares, "name": name}
    t0 = time.perf_counter()
    with _Env(env or {}):
        result = system.fit(fn, config=config, max_failures=1, label="restart", **kw)
    fit_s = time.perf_counter() - t0
    rv = result.return_value
    if not isinstance(rv, dict) or rv.get("first_attempt") or rv.get("restarted_at") is None:
        raise RuntimeError(f"{system.name}: the run did not end in a restarted attempt: return_value={rv!r}")
    killed = _read_float(os.path.join(d, "killed_at"))
    restarted = _read_float(os.path.join(d, "first_report_after_restart"))
    out = {"restart_s": restarted - killed, "fit_s": fit_s, "env": dict(env or {})}
    if spares:
        used = [e for e in read_run_dicts(result.path) if e.get("type") == "spare_used"]
        if not used:
            raise RuntimeError(f"{system.name}: spare_workers={spares} but no spare_used event in {result.path}")
        out["spares"] = spares
    return out


def bench_restarts(system: System, n: int) -> dict:
    """``n`` kills without and with a hot spare, alternating; medians of each."""
    plain, spare = [], []
    for k in range(n):
        plain.append(bench_restart(system))
        spare.append(bench_restart(system, spares=1))
    return {"plain": plain, "spare": spare,
            "plain_stats": _stats([r["restart_s"] for r in plain]),
            "spare_stats": _stats([r["restart_s"] for r in spare])}


def bench_worker_start(n: int) -> dict:
    """Create one fresh actor whose __init__ imports torch and ping it; kill it; n times."""
    import ray

    @ray.remote(num_cpus=1)
    class TorchActor:
        def __init__(self):
            import torch  # noqa: F401

        def ping(self):
            return os.getpid()

    times = []
    for k in range(n):
        log(f"one worker start {k + 1}/{n}")
        t0 = time.perf_counter()
        a = TorchActor.remote()
        ray.get(a.ping.remote())
        times.append(time.perf_counter() - t0)
        ray.kill(a, no_restart=True)
        time.sleep(0.5)  # let the process go before the next one
    return {"times_s": times, **_stats(times)}


def machine() -> dict:
    import ray
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "ray": ray.__version__, "torch": torch.__version__, "loadavg_at_start": load}


def evaluate(report: dict) -> list[str]:
    """The missed targets, as lines for a person."""
    tk, rt = report["trainkit"], report.get("ray_train")
    missed = []
    warm = tk["fit"]["warm"]["median"]
    if not warm < WARM_FIT_TARGET_S:
        missed.append(f"(a) trainkit warm fit median {warm:.2f} s is not under {WARM_FIT_TARGET_S:.0f} s")
    speedup = rt["fit"]["warm"]["median"] / warm if rt else FIT_SPEEDUP_TARGET
    if not speedup >= FIT_SPEEDUP_TARGET:
        missed.append(f"(a) trainkit warm fit is only {speedup:.1f}x faster than Ray Train's "
                      f"(target >= {FIT_SPEEDUP_TARGET:.0f}x)")
    rep = tk["report"]["median"]
    if not rep < REPORT_TARGET_S:
        missed.append(f"(b) trainkit median report() {rep * 1e3:.2f} ms is not under {REPORT_TARGET_S * 1e3:.0f} ms")
    limit = report["restart_target_s"]
    got = tk["restarts"]["plain_stats"]["median"]
    if not got < limit:
        missed.append(f"(c) trainkit SIGKILL -> first report after restart {got:.2f} s is not under "
                      f"{limit:.2f} s (3 s + one worker start)")
    spare = tk["restarts"]["spare_stats"]["median"]
    if not spare <= SPARE_TARGET_S:
        missed.append(f"(d) trainkit SIGKILL -> first report with a hot spare, median {spare:.2f} s, is not "
                      f"<= {SPARE_TARGET_S:.1f} s")
    return missed


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tk = report["trainkit"]
    rt = report.get("ray_train")
    ok = lambda b: "[green]ok[/green]" if b else "[red]MISSED[/red]"  # noqa: E731
    s = lambda x: f"{x:.2f} s"  # noqa: E731
    ms = lambda x: f"{x * 1e3:.2f} ms" if x < 0.1 else f"{x * 1e3:.0f} ms"  # noqa: E731
    ratio = lambda r, t: f"{r / t:.1f}x" if r is not None and t > 0 else ""  # noqa: E731
    mark = lambda st: f"{st['median']:.2f} s (min {st['min']:.2f})"  # noqa: E731
    rec = lambda key, fmt: f"{fmt(RAY_TRAIN_RECORDED[key])} (recorded)"  # noqa: E731

    table = Table(title=f"trainkit vs Ray Train {report['machine']['ray']}: {WORKERS} workers, same machine, "
                        "one Ray cluster (num_cpus=4)")
    for col, kw in (("figure", {}), ("trainkit", {"justify": "right"}), ("Ray Train", {"justify": "right"}),
                    ("Ray Train / trainkit", {"justify": "right"}), ("target (trainkit)", {}), ("status", {})):
        table.add_column(col, **kw)
    table.add_row("ray.init(num_cpus=4), once for both", s(report["ray_init_s"]), "", "", "", "info")
    ws = report["worker_start"]
    table.add_row(f"one worker start (torch actor create + ping), median (n={ws['n']})",
                  f"{mark(ws)}", "", "", "", "info")
    f_tk = tk["fit"]
    table.add_row(f"(a) first (cold) fit, {FIT_REPORTS} reports", s(f_tk["first_s"]),
                  s(rt["fit"]["first_s"]) if rt else "", ratio(rt and rt["fit"]["first_s"], f_tk["first_s"]), "",
                  "info")
    wt = f_tk["warm"]
    wr = rt["fit"]["warm"]["median"] if rt else RAY_TRAIN_RECORDED["warm_fit_s"]
    a_ok = wt["median"] < WARM_FIT_TARGET_S and wr / wt["median"] >= FIT_SPEEDUP_TARGET
    table.add_row(f"(a) warm fit, {FIT_REPORTS} reports, median (n={wt['n']})", mark(wt),
                  mark(rt["fit"]["warm"]) if rt else rec("warm_fit_s", s), ratio(wr, wt["median"]),
                  f"< {WARM_FIT_TARGET_S:.0f} s and >= {FIT_SPEEDUP_TARGET:.0f}x", ok(a_ok))
    r_tk = tk["report"]
    rr = rt["report"]["median"] if rt else RAY_TRAIN_RECORDED["report_s"]
    table.add_row(f"(b) report(), no checkpoint, rank 0: median (p90); n={r_tk['n']}"
                  + (f" / {rt['report']['n']}" if rt else "") + " (Ray Train: defaults, 2 s poll)",
                  f"{ms(r_tk['median'])} ({ms(r_tk['p90'])})",
                  f"{ms(rt['report']['median'])} ({ms(rt['report']['p90'])})" if rt else rec("report_s", ms),
                  ratio(rr, r_tk["median"]), f"< {REPORT_TARGET_S * 1e3:.0f} ms", ok(r_tk["median"] < REPORT_TARGET_S))
    rs = tk["restarts"]
    c_tk, c_sp = rs["plain_stats"], rs["spare_stats"]
    c_rt = rt["restart"]["restart_s"] if rt else RAY_TRAIN_RECORDED["restart_s"]
    lim = report["restart_target_s"]
    table.add_row(f"(c) SIGKILL rank 1 -> first report of the restarted group, spare_workers=0, median "
                  f"(n={c_tk['n']}; Ray Train: defaults, one fit)", mark(c_tk),
                  s(c_rt) if rt else rec("restart_s", s), ratio(c_rt, c_tk["median"]),
                  f"< 3 s + 1 worker start = {lim:.2f} s", ok(c_tk["median"] < lim))
    c_rtt = (rt["restart_tuned"]["restart_s"] if rt and rt.get("restart_tuned")
             else None if rt else RAY_TRAIN_RECORDED["restart_tuned_s"])
    if c_rtt is not None:
        table.add_row("(c) same, Ray Train with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1", "",
                      s(c_rtt) + ("" if rt else " (recorded)"), ratio(c_rtt, c_tk["median"]), "", "info")
    table.add_row(f"(d) SIGKILL rank 1 -> first report of the repaired group, spare_workers=1 (hot spare), "
                  f"median (n={c_sp['n']})", mark(c_sp), s(c_rt) if rt else rec("restart_s", s),
                  ratio(c_rt, c_sp["median"]), f"<= {SPARE_TARGET_S:.1f} s", ok(c_sp["median"] <= SPARE_TARGET_S))
    fit_tk = statistics.median(r["fit_s"] for r in rs["plain"])
    table.add_row("(c) the whole fit (5 reports, kill, restart, 5 reports), spare_workers=0", s(fit_tk),
                  s(rt["restart"]["fit_s"]) if rt else "", ratio(rt and rt["restart"]["fit_s"], fit_tk), "", "info")
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(table)
    load = report["machine"].get("loadavg_at_start")
    if load:
        console.print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end: "
                      + " ".join(f"{x:.2f}" for x in report.get("loadavg_at_end") or ())
                      + f" (cpus: {report['machine']['cpus']}); total {report['total_s']:.0f} s")
    if not rt:
        console.print("Ray Train not run (--no-ray-train): its figures are the recorded ones of docs/benchmarks.md "
                      "(2026-11-23, load average 1.4)")
    for line in report["missed"]:
        console.print(f"[red]MISSED[/red] {line}")
    if not report["missed"]:
        console.print("[green]every target holds[/green]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="trainkit vs Ray Train 2.60, side by side (issue 3)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 warm fit each, 10 Ray Train reports, 1 worker start")
    p.add_argument("--fits", type=int, default=None, help="warm fits per system (default 3; --quick 1)")
    p.add_argument("--reports", type=int, default=200, help="timed trainkit reports (default 200)")
    p.add_argument("--ray-reports", type=int, default=None,
                   help="timed Ray Train reports (default 20, --quick 10; each takes ~2 s)")
    p.add_argument("--starts", type=int, default=None, help="timed worker starts (default 3; --quick 1)")
    p.add_argument("--restarts", type=int, default=None,
                   help="trainkit kills per variant, without and with a spare (default 3; --quick 1)")
    p.add_argument("--no-ray-train", action="store_true",
                   help="skip Ray Train (its column shows the recorded figures of docs/benchmarks.md)")
    p.add_argument("--no-ray-tuned", action="store_true",
                   help="skip the Ray Train restart row with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1")
    p.add_argument("--dir", default=None, help="scratch folder for run folders (default: a temp dir)")
    args = p.parse_args(argv)
    n_fits = args.fits if args.fits is not None else (1 if args.quick else 3)
    n_rt_reports = args.ray_reports if args.ray_reports is not None else (10 if args.quick else 20)
    n_starts = args.starts if args.starts is not None else (1 if args.quick else 3)
    n_restarts = args.restarts if args.restarts is not None else (1 if args.quick else 3)
    if n_fits < 1 or args.reports < 1 or n_rt_reports < 1 or n_starts < 1 or n_restarts < 1:
        p.error("--fits, --reports, --ray-reports, --starts and --restarts must be >= 1")

    os.environ.setdefault("TRAINKIT_PROGRESS", "0")  # keep the terminal for the table
    try:  # both systems are imported before any timing
        import ray
        import ray.train.torch  # noqa: F401
        import trainkit.torch  # noqa: F401
        from trainkit.backends.ray import release_warm_workers
    except ImportError as e:
        print(f"bench_distributed: cannot import Ray Train or trainkit: {e}\n"
              "  Ray Train is not importable: pip install 'ray[train]==2.60.0'",
              file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    mach = machine()
    # Ray and its workers print to stdout (worker deaths, Ray Train's logs): send all of it to stderr
    # while the benchmark runs, so that stdout holds only the table (or the JSON with --json -).
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    base = tempfile.mkdtemp(prefix="trainkit_bench_dist_", dir=args.dir)
    report: dict = {"machine": mach, "workers": WORKERS, "quick": args.quick}
    try:
        log("ray.init(num_cpus=4, include_dashboard=False)")
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        report["ray_init_s"] = time.perf_counter() - t0

        tk = Trainkit(base)
        report["trainkit"] = {"fit": bench_fit(tk, n_fits), "report": bench_report(tk, args.reports),
                              "restarts": bench_restarts(tk, n_restarts)}
        log("trainkit: release_warm_workers()")
        release_warm_workers()
        report["worker_start"] = bench_worker_start(n_starts)
        report["restart_target_s"] = RESTART_BASE_TARGET_S + report["worker_start"]["median"]

        if not args.no_ray_train:
            rt = RayTrain(base)
            report["ray_train"] = {"fit": bench_fit(rt, n_fits), "report": bench_report(rt, n_rt_reports),
                                   "restart": bench_restart(rt)}
            if not args.no_ray_tuned:
                report["ray_train"]["restart_tuned"] = bench_restart(rt, RAY_TUNED_ENV)
    finally:
        try:
            import ray

            if ray.is_initialized():
                log("ray.shutdown()")
                ray.shutdown()
        finally:
            shutil.rmtree(base, ignore_errors=True)
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
    report["total_s"] = time.perf_counter() - t_start
    report["loadavg_at_end"] = os.getloadavg()
    report["missed"] = evaluate(report)
    report["ok"] = not report["missed"]
    if args.json != "-":
        print_table(report)
    write_json(report, args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
