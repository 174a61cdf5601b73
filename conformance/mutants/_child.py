"""One mutant's conformance run, inside the temporary copy of the tree (``python -m conformance.mutants._child``).

Started by ``conformance.mutants.run`` with the copy as its working directory and first on
``PYTHONPATH``. It first checks that ``trainkit`` and ``conformance`` are imported from the
copy (``--root``), else exits 3; with ``--probe`` it also starts the suite's private Ray
(``conformance.harness.ray_for``, as the conformance fixture does) and checks that a rank
worker, and a plain Ray task, import ``trainkit`` from the copy too. Then it runs the cases
(``-k``) on the ``ray`` backend through the suite's own pytest entry (``runner.pytest_args``)
with a per-case timeout, and writes ``{"cases": [...], "probe": {...}}`` to ``--json``.
Runs in the child process; its Ray processes inherit its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def _inside(path: str, root: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _probe_fn(config):
    import sys as _sys

    import trainkit
    from conformance.harness import put

    rank = trainkit.get_context().get_world_rank()
    put(config["dir"], f"probe-{rank}.json", {"trainkit": trainkit.__file__,
                                              "worker": _sys.modules["trainkit.backends.ray.worker"].__file__})


def probe(root: str) -> dict:
    """Where a 2-rank fit's workers and a Ray task import trainkit from (every path must be under ``root``)."""
    import ray

    from conformance.harness import Harness, ray_for, resolve_backend

    backend = resolve_backend("ray")
    with ray_for(backend), tempfile.TemporaryDirectory(prefix="tkmut-probe-") as tmp:
        tk = Harness("ray", backend, tmp)
        tk.fit(_probe_fn, workers=2, config={"dir": tk.dir})
        seen = tk.read_all("probe-")

        @ray.remote(num_cpus=0)
        def where() -> str:
            import trainkit

            return trainkit.__file__

        task = ray.get(where.remote())
    paths = [task] + [p for v in seen.values() for p in v.values()]
    return {"ranks": len(seen), "paths": sorted(set(paths)), "ok": len(seen) == 2 and all(_inside(p, root)
                                                                                         for p in paths)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("-k", dest="keyword", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--case-timeout-s", type=int, default=90)
    p.add_argument("--probe", action="store_true")
    args = p.parse_args(argv)

    import conformance
    import trainkit

    out: dict = {"trainkit": trainkit.__file__, "conformance": conformance.__file__, "cases": [], "probe": None}
    if not (_inside(trainkit.__file__, args.root) and _inside(conformance.__file__, args.root)):
        out["error"] = f"trainkit or conformance imported from outside {args.root}"
        _write(args.json, out)
        return 3
    if args.probe:
        out["probe"] = probe(args.root)
        if not out["probe"]["ok"]:
            out["error"] = f"Ray workers imported trainkit from outside {args.root}: {out['probe']['paths']}"
            _write(args.json, out)
            return 3
    import pytest

    from conformance.report import Collector
    from conformance.runner import pytest_args

    collector = Collector("ray")
    extra = [f"--timeout={args.case_timeout_s}", f"--basetemp={os.path.join(args.root, '.basetemp')}"]
    rc = pytest.main(pytest_args("ray", args.keyword, extra), plugins=[collector])
    out["pytest_exit"] = int(rc)
    out["cases"] = [{"id": r["id"], "outcome": r["outcome"], "reason": r.get("reason", "")[:300]}
                    for r in collector.records()]
    _write(args.json, out)
    return 0


def _write(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
