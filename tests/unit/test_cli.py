"""The ``trainkit`` command's boundary: help for a user, missing extras, errors without tracebacks, closed pipes."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trainkit import cli, extras
from trainkit.errors import ConfigError, MissingExtraError

ROOT = Path(__file__).resolve().parents[2]


def test_help_describes_every_command_for_a_user(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "parse the command line" not in out and "``" not in out  # no internal docstring
    for command, words in (("chaos", "fault-injection scenario"), ("diagnose", "explain a run"),
                           ("conformance", "conformance suite")):
        assert command in out and words in out
    assert "exit codes" in out and "-v, --verbose" in out


def test_every_extra_named_in_code_is_declared_in_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(declared)
    assert {"s3", "chaos", "debug", "testing", "ray-train", "examples", "lightning", "transformers", "test",
            "all"} == set(declared)
    assert set(declared["all"][0].split("[")[1].rstrip("]").split(",")) == set(declared) - {"test", "all"}


def test_a_missing_module_names_the_extra_and_the_pip_command():
    with pytest.raises(MissingExtraError) as info:
        extras.require("chaos", "trainkit chaos", ("trainkit_no_such_module_a", "json", "trainkit_no_such_b"))
    e = info.value
    assert e.missing == ("trainkit_no_such_module_a", "trainkit_no_such_b") and e.extra == "chaos"
    assert str(e) == ("trainkit chaos needs the 'chaos' extra "
                      f"(not installed: trainkit_no_such_module_a, trainkit_no_such_b); install it with: {e.hint}")
    assert e.hint.startswith("pip install") and "[chaos]" in e.hint
    assert isinstance(e, ImportError)


def test_the_pip_command_of_a_checkout_is_editable_with_its_constraints(monkeypatch, tmp_path):
    checkout = tmp_path / "trainkit-src"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / ".ci" / "constraints.txt").write_text("")
    monkeypatch.setattr(extras, "_editable_root", lambda: str(checkout))
    monkeypatch.chdir(checkout)
    assert extras.pip_command("s3") == 'pip install -c .ci/constraints.txt -e ".[s3]"'
    monkeypatch.setattr(extras, "_editable_root", lambda: None)
    assert extras.pip_command("s3") == "pip install 'trainkit[s3]'"


@pytest.mark.parametrize("argv, extra", [(["chaos", "scenarios/preempt.yaml"], "chaos"),
                                         (["conformance", "--backend", "local"], "testing")])
def test_a_command_without_its_extra_prints_error_and_pip_command_without_traceback(monkeypatch, capsys, argv,
                                                                                      extra):
    monkeypatch.setitem(extras.EXTRAS, extra, extras.EXTRAS[extra] + ("trainkit_no_such_module",))
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: trainkit {argv[0]} needs the '{extra}' extra (not installed: trainkit_no_such_module); "
        "install it with: pip install ")
    assert f'[{extra}]"' in lines[0] or f"[{extra}]'" in lines[0]
    assert "Traceback" not in err


def test_s3_storage_without_the_s3_extra_is_a_clear_error_before_anything_runs(monkeypatch):
    from trainkit.storage import resolve_filesystem

    monkeypatch.setitem(extras.EXTRAS, "s3", ("trainkit_no_such_s3fs",))
    with pytest.raises(MissingExtraError, match=r"storage 's3://bucket/runs' needs the 's3' extra"):
        resolve_filesystem("s3://bucket/runs")


def test_rank_debugger_without_the_debug_extra_is_a_clear_error(monkeypatch):
    from trainkit.diagnostics.debug import RankDebugger

    monkeypatch.setitem(extras.EXTRAS, "debug", ("trainkit_no_such_debugpy",))
    with pytest.raises(MissingExtraError, match="RankDebugger needs the 'debug' extra") as info:
        RankDebugger(rank=0)
    assert "[debug]" in info.value.hint


def test_a_trainkit_error_is_error_and_hint_and_a_traceback_only_with_verbose(monkeypatch, capsys):
    def fails(args):
        raise ConfigError("ScalingConfig.num_workers", -1, "an int >= 0", hint="use 0 for local mode")

    monkeypatch.setattr(cli, "_run", fails)
    assert cli.main(["diagnose", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ScalingConfig.num_workers=-1 is invalid") and "Traceback" not in err
    assert cli.main(["-v", "diagnose", "somewhere"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_bug_is_not_hidden_behind_an_error_line(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["diagnose", "somewhere"])


def _a_run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text("")  # an empty run is still a run diagnose reports on
    return run


@pytest.mark.integration  # a subprocess and a real pipe
def test_every_command_exits_quietly_on_a_closed_pipe(tmp_path):
    run = _a_run_folder(tmp_path)
    for argv in (["diagnose", str(run)], ["diagnose", str(run), "--json", "-"], ["--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "trainkit.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first write: every write gets EPIPE
        err = proc.stderr.read().decode()
        # argparse's help swallows the error itself (exit 0); our own output exits like a shell tool
        assert proc.wait(timeout=60) == (0 if argv == ["--help"] else cli.BROKEN_PIPE), (argv, err)
        assert err == "", (argv, err)
