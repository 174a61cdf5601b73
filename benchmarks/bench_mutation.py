"""The conformance suite's mutation score (issue 19): named bugs planted in copies of the ``ray`` backend.

For each mutant of ``conformance/mutants/catalog.py`` (one exact text replacement in one
file of the reference backend or a shared rule it uses), a temporary copy of the tree gets
the replacement and the mutant's cases run against it on the ``ray`` backend in a bounded
subprocess whose imports (Ray workers included) come from the copy. The installed code is
never changed. A baseline run without any mutant must pass every selected case first.

    python benchmarks/bench_mutation.py                   # every mutant: about 30 minutes on 2 cores
    python benchmarks/bench_mutation.py --sample          # the CI sample (3 fast mutants)
    python benchmarks/bench_mutation.py --only shard-overlap --json out.json
    python benchmarks/bench_mutation.py --list            # the catalog, without running anything

Prints the table (mutant, category, rule, killed by: the case ids that failed, or SURVIVED)
and the mutation score (killed / all). ``--json OUT`` writes the same (``-``: stdout only).
Exit code: 0 when the score meets ``--target`` (default 90%), 1 when it does not or the
baseline fails, 2 on bad arguments (an unknown mutant, a replacement that no longer matches).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/bench_mutation.py`: the repository's conformance package

from _common import write_json  # noqa: E402

from conformance.mutants import BY_NAME, MUTANTS, SAMPLE, MutantError, check_all  # noqa: E402
from conformance.mutants import run as mrun  # noqa: E402


def _table(results, title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("mutant", "category", "rule", "killed by", "s"):
        table.add_column(col, overflow="fold", justify="right" if col == "s" else "left")
    for r in results:
        killed_by = r.killed_by_text()
        style = None if r.killed else "bold red"
        table.add_row(r.name, r.category, r.rule, killed_by, f"{r.wall_s:.0f}", style=style)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", action="store_true", help=f"run the fixed CI sample ({', '.join(SAMPLE)})")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    p.add_argument("--list", action="store_true", help="print the catalog and exit")
    p.add_argument("--json", default=None, help="write the table and score to OUT (- for stdout)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="bound of one mutant's run (default 300)")
    p.add_argument("--case-timeout-s", type=int, default=mrun.CASE_TIMEOUT_S,
                   help=f"pytest-timeout per case (default {mrun.CASE_TIMEOUT_S})")
    p.add_argument("--target", type=float, default=90.0, help="mutation score target in %% (default 90)")
    args = p.parse_args(argv)

    from rich.console import Console

    console = Console(stderr=args.json == "-", width=None if sys.stdout.isatty() else 160)
    unknown = [n for n in args.only if n not in BY_NAME]
    if unknown:
        console.print(f"error: unknown mutant(s) {', '.join(unknown)}; --list shows the catalog")
        return 2
    problems = check_all()
    if problems:
        console.print("error: mutant(s) no longer apply to this tree:\n" + "\n".join(problems), markup=False)
        return 2
    chosen = [BY_NAME[n] for n in args.only] if args.only else [BY_NAME[n] for n in SAMPLE] if args.sample \
        else list(MUTANTS)
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.category:22} {m.path}:  {m.rule}  [{m.keyword}]")
        return 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        ids = sorted({cid for m in chosen for cid in m.cases})
        task = progress.add_task(f"baseline: {len(ids)} case(s), no mutant", total=len(chosen))
        state = {"killed": 0}

        def on_start(m):
            progress.update(task, description=f"{m.name} ({m.keyword})")

        def on_done(r):
            state["killed"] += r.killed
            progress.advance(task)
            progress.console.print(f"  {r.name}: {r.killed_by_text()} ({r.wall_s:.0f} s)", markup=False,
                                   highlight=False)

        try:
            base, results = mrun.run_all(chosen, timeout_s=args.timeout_s, case_timeout_s=args.case_timeout_s,
                                         on_start=on_start, on_done=on_done)
        except mrun.BaselineError as e:
            console.print(f"error: {e}", markup=False, highlight=False)
            console.print("hint: fix the suite (or the backend) first: a mutation score means nothing while "
                          "the cases fail without a mutant", markup=False)
            return 1
        except MutantError as e:
            console.print(f"error: {e}", markup=False)
            return 2
    wall_s = time.monotonic() - t0
    score = mrun.score(results)
    killed = sum(r.killed for r in results)
    survivors = [r.name for r in results if not r.killed]
    doc = {"score_pct": round(score, 1), "killed": killed, "mutants": len(results), "survivors": survivors,
           "target_pct": args.target, "target_met": score >= args.target, "wall_s": round(wall_s, 1),
           "baseline": {"cases": len(base.cases), "wall_s": round(base.wall_s, 1), "probe": base.probe},
           "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0], "cpus": os.cpu_count(),
           "python": platform.python_version(), "results": [r.to_dict() for r in results]}
    if args.json != "-":
        console.print(_table(results, "trainkit conformance: mutation check on backend ray"))
        console.print(f"baseline: {len(base.cases)} case(s) passed without a mutant in {base.wall_s:.0f} s; Ray "
                      f"workers imported the copy: {bool(base.probe and base.probe.get('ok'))}", markup=False)
        console.print(f"mutation score: {killed}/{len(results)} killed = {score:.1f}% (target >= {args.target:g}%: "
                      f"{'ok' if score >= args.target else 'MISSED'}) in {wall_s / 60:.1f} min; load average "
                      f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", markup=False)
        if survivors:
            console.print("survived: " + ", ".join(survivors), markup=False)
    write_json(doc, args.json)
    return 0 if score >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
