"""The import swap, made true: programs written as the Ray Train V2 docs write them
(tests/integration/ray_programs/, both import styles) are rewritten by ``python -m trainkit.migrate``
and then run unchanged in local mode, under torchrun and on Ray workers."""

from __future__ import annotations

import json
import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest

from trainkit_testing.torchrun import launch_env, run_process_group, torchrun_command

pytestmark = [pytest.mark.integration, pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(240)]

PROGRAMS = pathlib.Path(__file__).parent / "ray_programs"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("migrated")
    for p in PROGRAMS.glob("*.py"):
        shutil.copy(p, d / p.name)
    files = sorted(str(p) for p in d.glob("*.py"))
    before = {f: pathlib.Path(f).read_text() for f in files}
    proc = subprocess.run([sys.executable, "-m", "trainkit.migrate", *files], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for f in files:
        after = pathlib.Path(f).read_text()
        assert after != before[f], f"{f} was not rewritten"
        assert "import trainkit" in after
        assert "ray.train" not in "\n".join(line.split("#")[0] for line in after.splitlines()), after
    check = subprocess.run([sys.executable, "-m", "trainkit.migrate", "--check", *files], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, "a second migration would change the files again:\n" + check.stdout
    return d


def _run_here(program: pathlib.Path, monkeypatch, **env) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("RANK", raising=False)
    runpy.run_path(str(program), run_name="__main__")


def _subprocess(cmd, cwd, timeout_s=150, **env) -> subprocess.CompletedProcess:
    full = launch_env(unset=("RAY_ADDRESS",), **{k: str(v) for k, v in env.items()})
    try:
        return run_process_group(cmd, cwd=cwd, env=full, timeout_s=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{cmd} did not end within {timeout_s} s:\n{e.output[-4000:]}")


def _check_getting_started(out: pathlib.Path, storage: pathlib.Path) -> None:
    data = json.loads(out.read_text())
    assert data["metrics"]["epoch"] == 1 and data["metrics"]["loss"] > 0
    assert data["keys"] == ["0.bias", "0.weight", "4.bias", "4.weight"], "the checkpoint holds the model's state"
    assert pathlib.Path(data["path"]) == storage / "getting_started"
    assert (storage / "getting_started" / "checkpoint_2" / "model.pt").exists()


def test_the_getting_started_program_in_local_mode(migrated, tmp_path, monkeypatch):
    _run_here(migrated / "getting_started.py", monkeypatch, NUM_WORKERS=0, STORAGE=tmp_path / "s", OUT=tmp_path / "o")
    _check_getting_started(tmp_path / "o", tmp_path / "s")


def test_the_getting_started_program_on_two_ray_workers(migrated, tmp_path, monkeypatch, ray_up):
    _run_here(migrated / "getting_started.py", monkeypatch, NUM_WORKERS=2, STORAGE=tmp_path / "s", OUT=tmp_path / "o")
    _check_getting_started(tmp_path / "o", tmp_path / "s")


def test_the_getting_started_program_under_torchrun(migrated, tmp_path):
    cmd = torchrun_command(str(migrated / "getting_started.py"))
    proc = _subprocess(cmd, tmp_path, NUM_WORKERS=0, STORAGE=tmp_path / "s", OUT=tmp_path / "o")
    assert proc.returncode == 0, proc.stdout[-4000:]
    _check_getting_started(tmp_path / "o", tmp_path / "s")


def test_the_local_mode_unit_tests_of_the_ray_docs_pass_under_pytest(migrated, tmp_path):
    # Ray Data's auto-init in that process would join any Ray it finds running (this session's, another
    # pytest's); RAY_ADDRESS=local makes it start its own, as on a machine with no cluster
    proc = _subprocess([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(migrated / "local_mode_unit_tests.py")], tmp_path, RAY_ADDRESS="local")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 passed" in proc.stdout


def test_the_fault_tolerance_program_resumes_from_its_checkpoint_on_ray_workers(migrated, tmp_path, monkeypatch,
                                                                              ray_up):
    marker = tmp_path / "crashed"
    _run_here(migrated / "fault_tolerance.py", monkeypatch, NUM_WORKERS=2, STORAGE=tmp_path / "s",
              OUT=tmp_path / "o", CRASH_ONCE=marker)
    _check_resumed(tmp_path / "o", marker)


def _check_resumed(out: pathlib.Path, marker: pathlib.Path) -> None:
    data = json.loads(out.read_text())
    assert marker.exists(), "the first attempt did crash"
    assert data["error"] is None
    assert data["metrics"] == {"epoch": 3, "start_epoch": 2}, "the retry resumed after the epoch-1 checkpoint"


def test_the_fault_tolerance_program_resumes_in_local_mode(migrated, tmp_path, monkeypatch):
    # a deliberate difference (docs/local_mode.md): trainkit's local mode retries in-process, Ray's does not
    _run_here(migrated / "fault_tolerance.py", monkeypatch, NUM_WORKERS=0, STORAGE=tmp_path / "s",
              OUT=tmp_path / "o", CRASH_ONCE=tmp_path / "crashed")
    _check_resumed(tmp_path / "o", tmp_path / "crashed")


def test_the_fault_tolerance_program_resumes_under_torchrun_restarts(migrated, tmp_path):
    # under torchrun the restart is torchrun's (--max-restarts), and the restarted fit() resumes by name
    cmd = torchrun_command(str(migrated / "fault_tolerance.py"), max_restarts=1)
    proc = _subprocess(cmd, tmp_path, NUM_WORKERS=0, STORAGE=tmp_path / "s", OUT=tmp_path / "o",
                       CRASH_ONCE=tmp_path / "crashed")
    assert proc.returncode == 0, proc.stdout[-4000:]
    _check_resumed(tmp_path / "o", tmp_path / "crashed")
