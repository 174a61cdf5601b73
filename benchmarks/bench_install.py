"""The README's first command on a fresh machine: install time and the main job's verdict (issue 13).

Clones this repository's HEAD into a temporary folder, makes a fresh virtualenv there, and
runs the README's first command exactly as the README spells it (read from README.md, so
the figure follows the README), with an empty pip cache, as on a new machine. The command
is split at its ``&&``: the install part is timed on its own, then the main job runs.

    python benchmarks/bench_install.py [--target-s 180] [--json OUT] [--keep]

Target (issue 13): the install part in <= 180 s on this 2-core machine, and the main job
exits 0. Exit 0 when both hold, 1 when not, 2 on bad arguments or a README without the
command. Takes 3-5 minutes. Runs pip and a Ray cluster: do not run it beside the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from _common import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(readme: str) -> list[str]:
    """The bash blocks of the README's set-up section, in order (the first installs and runs the main job)."""
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)]


def run(cmd: str, cwd: str, env: dict, log) -> tuple[int, float]:
    t0 = time.monotonic()
    print(f"$ {cmd}", flush=True)
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, time.monotonic() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-s", type=float, default=180.0, help="install time target in seconds (default 180)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the figures as JSON to OUT (- for stdout)")
    p.add_argument("--keep", action="store_true", help="keep the clone, venv and logs")
    args = p.parse_args(argv)

    blocks = readme_commands(open(os.path.join(ROOT, "README.md")).read())
    if not blocks or "&&" not in blocks[0]:
        print("error: README.md's first bash block is not `INSTALL && MAIN JOB`", file=sys.stderr)
        return 2
    install, main_job = (part.strip() for part in blocks[0].split("&&", 1))

    work = tempfile.mkdtemp(prefix="tk-install-")
    clone = os.path.join(work, "trainkit")
    subprocess.run(["git", "clone", "--quiet", ROOT, clone], check=True)
    subprocess.run([sys.executable, "-m", "venv", os.path.join(work, "venv")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "RAY_"))}
    env.update(PATH=os.path.join(work, "venv", "bin") + os.pathsep + env.get("PATH", ""),
               VIRTUAL_ENV=os.path.join(work, "venv"), PIP_CACHE_DIR=os.path.join(work, "pip-cache"))
    log_path = os.path.join(work, "log.txt")
    with open(log_path, "w") as log:
        rc_install, install_s = run(install, clone, env, log)
        rc_job, job_s = (run(main_job, clone, env, log) if rc_install == 0 else (None, 0.0))
    tail = open(log_path).read()[-3000:]

    ok = rc_install == 0 and install_s <= args.target_s and rc_job == 0
    print(f"{'install':<12} {install_s:7.1f} s  exit {rc_install}  (target <= {args.target_s:.0f} s)")
    print(f"{'main job':<12} {job_s:7.1f} s  exit {rc_job}")
    print(f"command: {blocks[0]}")
    if not ok:
        print(tail)
    write_json({"command": blocks[0], "install_s": round(install_s, 1), "install_exit": rc_install,
                "main_job_s": round(job_s, 1), "main_job_exit": rc_job, "target_s": args.target_s,
                "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"), "passed": ok}, args.json)
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
