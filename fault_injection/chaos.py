"""``trainkit chaos PATH``: run a scenario on its own local cluster, inject its faults, judge the run.

    scenario file --load/validate--> Scenario (exit 2 on a bad file: file, line, key, did you mean)
    -> --json / --plot paths checked (exit 2 on a path that cannot be written, before anything runs)
    -> moto S3 server if `run.storage: s3` (trainkit_testing.s3.MotoS3)
    -> a private local cluster (trainkit_testing.cluster.Cluster: its own RAY_TMPDIR, fast node-death
       checks): a head node without CPUs (driver, controller, broker) and `cluster.nodes` virtual
       nodes of `cpus_per_node` CPUs, node i carrying resource tk_node_<i>
    -> fit() of the workload with a FaultPlan (and a NodeBroker for node faults), live progress
       on a terminal from the run's events.jsonl
    -> verdicts from events.jsonl + run_state.json (a row per fault: it fired; then the scenario's
       expectations, or without any the default one: the run finished), a verdict table and a
       text timeline, --json (trainkit.jsonout.write_json) and --plot; everything this started
       is shut down again.

Exit codes: 0 every expectation holds, 1 some do not, 2 bad scenario or usage.
``run_scenario()`` is the same without printing, for tests and benchmarks. Runs in the driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from trainkit.errors import ConfigError, OutputError, ScenarioError, TrainingFailedError
from trainkit.jsonout import check_writable, write_json
from trainkit_testing.environ import Environ

from fault_injection import faults as F
from fault_injection import timeline, verdicts
from fault_injection.scenario import Scenario, load_scenario, resolve_entry

USAGE_ERROR = 2
S3_BUCKET = "trainkit-chaos"  # the bucket of `run.storage: s3` scenarios on the runner's moto server


@dataclass
class Outcome:
    scenario: str
    rows: list
    run_path: str
    events: list
    state: Optional[dict]
    elapsed_s: float
    error: Optional[BaseException] = None
    recoveries: list = field(default_factory=list)
    events_problem: str = ""
    defaults: bool = False  # the scenario sets no expectation: judged on the default ones

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "passed": self.passed,
                "expectations": [r.to_dict() for r in self.rows], "run_path": self.run_path,
                "elapsed_s": round(self.elapsed_s, 3), "recoveries": self.recoveries}


def run_scenario(scenario: Scenario, *, backend: str = "ray", seed: Optional[int] = None,
                 storage: Optional[str] = None, on_line=None) -> Outcome:
    """Run one scenario on a fresh local cluster and judge it; ``on_line(text)`` gets live timeline lines."""
    import ray

    from trainkit import DataParallelTrainer, FailureConfig, HangConfig, RunConfig, ScalingConfig
    from trainkit.backends.api import get_backend
    from fault_injection.broker import NodeBroker
    from fault_injection.injector import FaultPlan

    get_backend(backend)  # an unknown name fails before anything starts
    if ray.is_initialized():
        raise ConfigError("trainkit chaos", "ray already initialized",
                          "a process without Ray: the runner starts its own cluster", hint="call ray.shutdown() first")
    fn = resolve_entry(scenario.workload.entry)
    t_start = time.monotonic()
    env = Environ()
    env.set(TRAINKIT_PROGRESS="0")  # before Ray starts: inherited by every Ray process
    moto = cluster = broker = tail = None
    error = None
    try:
        if scenario.run.storage == "s3":
            storage, moto = _start_s3(env, storage)
        elif storage is None:
            storage = os.path.join(tempfile.mkdtemp(prefix="trainkit_chaos_"), "runs")
        if backend != "local":
            node_faults = any(F.is_node_fault(f) for f in scenario.faults)
            cluster = _cluster_for(scenario, node_faults).start()
            if node_faults:
                broker = NodeBroker(cluster.ray_cluster, cluster.virtual_nodes,
                                    cluster.cpus_per_node).start(background=False)
        plan = FaultPlan(scenario.faults, seed=scenario.seed if seed is None else seed, broker=broker)
        hang = (HangConfig(timeout_s=scenario.run.hang_timeout_s, action=scenario.run.hang_action)
                if scenario.run.hang_timeout_s else None)
        name = f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        rc = RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=scenario.run.max_failures),
                       hang_config=hang, callbacks=[plan])
        nw = scenario.scaling.num_workers
        scaling = ScalingConfig(num_workers=0 if backend == "local" else tuple(nw) if isinstance(nw, list) else nw)
        trainer = DataParallelTrainer(fn, train_loop_config=dict(scenario.workload.config), scaling_config=scaling,
                                      run_config=rc, backend=backend)
        from trainkit.storage import RunStore

        store = RunStore(storage, name)
        if on_line is not None:
            tail = _Tail(store, on_line)
            tail.start()
        if broker is None:
            try:
                trainer.fit()
            except TrainingFailedError as e:
                error = e
        else:  # fit() in a thread: the main thread serves node faults (Ray adds nodes from it only)
            done, box = threading.Event(), {}

            def fit():
                try:
                    trainer.fit()
                except BaseException as e:  # noqa: BLE001 - re-raised or judged below
                    box["error"] = e
                finally:
                    done.set()

            threading.Thread(target=fit, name="trainkit-chaos-fit", daemon=True).start()
            broker.serve(until=done)
            error = box.get("error")
            if error is not None and not isinstance(error, TrainingFailedError):
                raise error
        if tail is not None:
            tail.stop()
            tail = None
        return judge(scenario, store, time.monotonic() - t_start, error)  # before the S3 server stops
    finally:
        if tail is not None:
            tail.stop()
        if broker is not None:
            broker.stop()
        if cluster is not None:
            cluster.stop()
        if moto is not None:
            moto.stop()
        env.restore()


def judge(scenario: Scenario, store, elapsed_s: float = 0.0, error: Optional[BaseException] = None) -> Outcome:
    """Check the scenario's expectations against the run folder's files."""
    from trainkit import events as ev
    from trainkit.storage import EVENTS, MANIFEST

    read = ev.parse_events(store.read_bytes(EVENTS))
    state = store.read_json(MANIFEST)
    # every fault fired (a verdict over faults that never fired would mean nothing), then the expectations
    rows = verdicts.fault_rows(scenario.faults, read.events)
    rows += verdicts.check(scenario.expect, read.events, state, set(store.list_dirs()))
    return Outcome(scenario.name, rows, store.uri, read.events, state, elapsed_s, error,
                   verdicts.recovery_times(read.events), read.problem, defaults=scenario.expect.is_default)


def _cluster_for(scenario: Scenario, node_faults: bool):
    """The scenario's cluster, not started yet: `cluster.nodes` nodes of `cpus_per_node` CPUs, node i
    carrying the resource tk_node_<i>.

    Without node faults the head node is node 0 (one raylet fewer to start); with them it
    has no CPUs, so that every node that may go away is a virtual one.
    """
    from trainkit_testing.cluster import Cluster

    from fault_injection.broker import NODE_RESOURCE

    cpus = scenario.cluster.cpus_per_node
    first = 0 if node_faults else 1
    return Cluster(scenario.cluster.nodes - first, cpus, head_cpus=0 if node_faults else cpus,
                   head_resources=None if node_faults else {NODE_RESOURCE.format(0): 1},
                   node_resources=[{NODE_RESOURCE.format(i): 1} for i in range(first, scenario.cluster.nodes)],
                   log_to_driver=False, tmp_prefix="tkchaos-")


def _start_s3(env: Environ, storage: Optional[str]):
    """A moto S3 server on 127.0.0.1 that every Ray process reaches through AWS_* variables."""
    import logging

    from trainkit_testing.s3 import AWS_UNSET, MotoS3, clear_s3fs_cache

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per S3 request
    server = MotoS3().start()
    env.set(server.env)
    env.pop(*AWS_UNSET)
    server.create_bucket(name=S3_BUCKET)
    clear_s3fs_cache()
    return storage or f"s3://{S3_BUCKET}/runs", server


class _Tail(threading.Thread):
    """Live progress: reads the run's events.jsonl as it grows and passes new timeline lines on."""

    def __init__(self, store, on_line):
        super().__init__(name="trainkit-chaos-tail", daemon=True)
        self.store = store
        self.on_line = on_line
        self.seen = 0
        self.t0: Optional[float] = None
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(0.3):
            self.poll()
        self.poll()

    def poll(self) -> None:
        from trainkit import events as ev
        from trainkit.storage import EVENTS

        try:
            events = ev.parse_events(self.store.read_bytes(EVENTS) or b"").events
        except Exception:  # noqa: BLE001 - storage may be mid-write or gone
            return
        for e in events[self.seen:]:
            if self.t0 is None:
                self.t0 = e.time
            text = (f"report {e.index} committed (world size {e.world_size})" if isinstance(e, ev.ReportCommitted)
                    else timeline.describe(e))
            if text:
                self.on_line(f"{e.time - self.t0:+8.2f}s  {text}")
        self.seen = max(self.seen, len(events))

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(10)


# -- the command ---------------------------------------------------------------------------
def main(args) -> int:
    """``trainkit chaos``: 0 all expectations hold, 1 some fail, 2 bad scenario or usage.

    The terminal shows trainkit's own output only: Ray's driver-side output of the embedded
    cluster (nodes and workers the scenario killed, state dumps, connection notes, C++ logs)
    goes to ``logs/ray-driver.log`` in the run folder.
    """
    fd, ray_log = tempfile.mkstemp(prefix="trainkit-chaos-ray-", suffix=".log")
    os.close(fd)
    with _ray_output_to(ray_log) as (out, err):
        code, run_path = _main(args, out, err)
        kept = _keep_ray_log(ray_log, run_path)
        if kept:
            print(f"Ray's own output: {kept}", file=out if getattr(args, "json", None) != "-" else err)
    return code


def _main(args, out, err) -> tuple[int, Optional[str]]:
    from rich.console import Console

    to_stdout = getattr(args, "json", None) != "-"
    console = Console(file=out if to_stdout else err, highlight=False, soft_wrap=True)
    try:
        scenario = load_scenario(args.path)
    except ScenarioError as e:
        _usage_error(err, str(e), "fix the scenario file (its format: docs/chaos.md, docs/scenario.schema.json)")
        return USAGE_ERROR, None
    try:  # before the cluster starts: a path that cannot be written is found now, not after the run
        for option in ("json", "plot"):
            if getattr(args, option, None):
                check_writable(getattr(args, option), f"--{option}")
    except OutputError as e:
        _usage_error(err, str(e), "give a file in an existing folder you can write to (--json - for stdout)")
        return USAGE_ERROR, None
    backend = getattr(args, "backend", None) or scenario.backend or "ray"
    console.print(f"[bold]trainkit chaos[/]: {scenario.name} ({len(scenario.faults)} fault(s), backend {backend})")
    if scenario.description.strip():  # the whole description, as one paragraph
        console.print(" ".join(scenario.description.split()), markup=False, soft_wrap=False)
    live = console.is_terminal
    try:
        outcome = run_scenario(scenario, backend=backend, seed=getattr(args, "seed", None),
                               storage=getattr(args, "storage", None),
                               on_line=(lambda line: console.print(f"[dim]{line}[/]")) if live else None)
    except ConfigError as e:
        _usage_error(err, str(e), getattr(e, "hint", "") or "check the scenario and the command line")
        return USAGE_ERROR, None
    report(console, outcome, show_timeline=not live)
    try:  # checked before the run; what can still fail here (the folder went away) is an error, not a traceback
        if getattr(args, "plot", None):
            try:
                timeline.plot(outcome.events, args.plot, title=f"trainkit chaos: {scenario.name}")
            except OSError as e:
                raise OutputError(f"--plot {args.plot}: cannot write: {e.strerror or e}") from e
            console.print(f"timeline picture: {args.plot}")
        if getattr(args, "json", None):
            write_json(outcome.to_json(), args.json, indent=2, stdout=out)  # `-`: this stream, not Ray's output
    except OutputError as e:
        _usage_error(err, str(e), f"the run folder is kept: {outcome.run_path}")
        return USAGE_ERROR, outcome.run_path
    return (0 if outcome.passed else 1), outcome.run_path


@contextlib.contextmanager
def _ray_output_to(path: str):
    """Send what is written to file descriptors 1 and 2 inside the block to ``path``; yield (out, err)
    streams that stay on the original stdout and stderr, for trainkit's own output.

    Ray's driver prints the errors its cluster publishes (a raylet or worker that died, with a
    state dump) with ``print`` on ``sys.stdout``, logs through handlers bound to the original
    ``sys.stderr``, and its C++ core writes to fd 2: only a redirection of the descriptors
    catches all three. Streams without a descriptor (pytest's capsys) are left as they are.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        if (sys.stdout.fileno(), sys.stderr.fileno()) != (1, 2):
            raise ValueError("not the process's stdout/stderr")
    except (AttributeError, OSError, ValueError):
        yield sys.stdout, sys.stderr
        return
    saved = [os.dup(1), os.dup(2)]
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield out, err
    finally:
        for stream in (sys.stdout, sys.stderr, out, err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)
        out.close()
        err.close()


def _keep_ray_log(path: str, run_path: Optional[str]) -> Optional[str]:
    """Move Ray's output into the run folder (``logs/ray-driver.log``); where it stays when that fails."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        if os.path.exists(path):
            os.remove(path)
        return None
    if run_path and "://" not in run_path and os.path.isdir(run_path):  # remote storage: its server is gone
        dest = os.path.join(run_path, "logs", "ray-driver.log")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(path, dest)
        return dest
    return path


def _usage_error(err, message: str, hint: str) -> None:
    print(f"error: {message}\nhint: {hint}", file=err)


def report(console, outcome: Outcome, show_timeline: bool = True) -> None:
    from rich.table import Table

    if show_timeline:
        console.print("[bold]timeline[/]")
        for line in timeline.text_lines(outcome.events):
            console.print("  " + line, markup=False)
    if outcome.events_problem:
        console.print(f"note: {outcome.events_problem}", markup=False)
    rec = [r for r in outcome.recoveries if r["recovery_s"] is not None]
    if rec:
        console.print("recovery: " + ", ".join(f"attempt {r['attempt']} {r['fault'] or r['kind']} "
                                               f"{r['recovery_s']:.2f} s" for r in rec), markup=False)
    if outcome.defaults:
        console.print("no expectations in the scenario (`expect:`): judged on the defaults, the run finished "
                      "and every fault fired", markup=False)
    table = Table(title=f"verdict: {outcome.scenario}", title_justify="left")
    for col in ("expectation", "expected", "observed", "pass"):
        table.add_column(col)
    for r in outcome.rows:
        table.add_row(r.name, _cell(r.expected), _cell(r.observed), "[green]PASS[/]" if r.passed else "[red]FAIL[/]")
    console.print(table)
    verdict = "[green]PASSED[/]" if outcome.passed else "[red]FAILED[/]"
    console.print(f"{verdict} in {outcome.elapsed_s:.1f} s; run folder: {outcome.run_path}")


def _cell(v: Any) -> str:
    from rich.markup import escape

    return escape(json.dumps(v) if isinstance(v, (bool, type(None))) else str(v))
