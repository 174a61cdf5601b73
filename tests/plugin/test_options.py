"""The plugin's options, ini keys, marker, and the fixtures that need no Ray (in-process pytester)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

SHOW_SETTINGS = """
import pytest

def test_show(trainkit_settings, trainkit_workers, scaling_config, pytestconfig):
    print("SETTINGS", trainkit_settings.workers, trainkit_settings.nodes, trainkit_settings.backend,
          trainkit_settings.hang_timeout_s, trainkit_settings.keep_runs)
    print("WORKERS", trainkit_workers, scaling_config.num_workers, scaling_config.placement_strategy)
    print("OPTION", pytestconfig.getoption("trainkit_backend"), pytestconfig.getoption("trainkit_workers"))
"""


def test_importing_the_plugin_imports_neither_ray_torch_nor_moto():
    code = ("import sys, trainkit_testing.plugin, trainkit_testing.fixtures, trainkit_testing.strategies; "
            "print(sorted(m for m in ('ray', 'torch', 'moto', 'faker', 'boto3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_defaults_are_two_workers_two_nodes_on_ray(pytester):
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*SETTINGS 2 2 ray None False*", "*WORKERS 2 2 SPREAD*", "*OPTION ray 2*"])


def test_options_parse_and_reach_the_fixtures(pytester):
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest("-s", "--trainkit-workers=4", "--trainkit-nodes=1", "--trainkit-backend=ray_train",
                                "--trainkit-hang-timeout=2.5", "--trainkit-keep-runs")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*SETTINGS 4 1 ray_train 2.5 True*", "*WORKERS 4 4 PACK*", "*OPTION ray_train 4*"])


def test_ini_keys_set_the_same_settings_and_the_command_line_wins(pytester):
    pytester.makeini("[pytest]\ntrainkit_workers = 3\ntrainkit_nodes = 3\ntrainkit_backend = local\n"
                     "trainkit_hang_timeout = 7\ntrainkit_keep_runs = true\n")
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest("-s")
    result.stdout.fnmatch_lines(["*SETTINGS 3 3 local 7.0 True*", "*WORKERS 0 0 SPREAD*"])
    result = pytester.runpytest("-s", "--trainkit-backend=ray", "--trainkit-workers=5")
    result.stdout.fnmatch_lines(["*SETTINGS 5 3 ray 7.0 True*", "*WORKERS 5 5 SPREAD*"])


@pytest.mark.parametrize("args, message", [
    (["--trainkit-workers=0"], "*--trainkit-workers=0 is invalid: expected an int >= 1*"),
    (["--trainkit-workers=two"], "*--trainkit-workers='two' is invalid*"),
    (["--trainkit-nodes=-1"], "*--trainkit-nodes=-1 is invalid: expected an int >= 1*"),
    (["--trainkit-backend=rya"], "*--trainkit-backend='rya' is invalid: expected one of *local, ray, ray_train*"),
    (["--trainkit-hang-timeout=0"], "*--trainkit-hang-timeout='0' is invalid: expected a number of seconds > 0*"),
    (["--trainkit-hang-timeout=soon"], "*--trainkit-hang-timeout='soon' is invalid*"),
])
def test_bad_option_values_are_usage_errors_that_name_the_option(pytester, args, message):
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_bad_ini_value_is_a_usage_error(pytester):
    pytester.makeini("[pytest]\ntrainkit_nodes = many\n")
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--trainkit-nodes='many' is invalid*"])


def test_the_marker_overrides_the_options_for_one_test(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.trainkit(workers=4, nodes=1)
        def test_marked(trainkit_settings, trainkit_workers, scaling_config):
            print("MARKED", trainkit_workers, trainkit_settings.nodes, scaling_config.placement_strategy)

        @pytest.mark.trainkit(backend="local")
        def test_local(trainkit_workers, pytestconfig):
            print("LOCAL", trainkit_workers, pytestconfig.getoption("trainkit_backend"))

        def test_plain(trainkit_workers):
            print("PLAIN", trainkit_workers)
    """)
    result = pytester.runpytest("-s", "--trainkit-workers=3")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*MARKED 4 1 PACK*", "*LOCAL 0 ray*", "*PLAIN 3*"])


@pytest.mark.parametrize("marker, message", [
    ("workers=0", "*test_bad.py::test_bad: @pytest.mark.trainkit(workers=...)=0 is invalid*"),
    ("backend='nope'", "*@pytest.mark.trainkit(backend=...)='nope' is invalid: expected one of*"),
    ("worker=2", "*@pytest.mark.trainkit got unknown keyword(s) [[]'worker'[]]; allowed: workers, nodes, backend*"),
    ("2", "*@pytest.mark.trainkit takes keywords only*"),
])
def test_a_bad_marker_is_a_usage_error_before_any_test_runs(pytester, marker, message):
    pytester.makepyfile(test_bad=f"""
        import pytest

        @pytest.mark.trainkit({marker})
        def test_bad():
            pass
    """)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_marker_is_registered_for_strict_markers(pytester):
    pytester.makepyfile("import pytest\n@pytest.mark.trainkit(workers=1)\ndef test_x():\n    pass\n")
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.trainkit(workers=None, nodes=None, backend=None)*"])


def test_help_lists_the_options(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["trainkit: distributed training tests:", "*--trainkit-workers=WORKERS*",
                                 "*--trainkit-nodes=NODES*", "*--trainkit-backend=BACKEND*",
                                 "*--trainkit-hang-timeout=HANG_TIMEOUT*", "*--trainkit-keep-runs*"])


LOCAL_SUITE = """
import os
import trainkit

def train_fn(config):
    ckpt = trainkit.get_checkpoint()
    start = 0 if ckpt is None else int(open(os.path.join(ckpt.path, "step")).read())
    for step in range(start, start + config["steps"]):
        d = os.path.join(config["tmp"], f"ck{step}")
        os.makedirs(d)
        open(os.path.join(d, "step"), "w").write(str(step + 1))
        trainkit.report({"step": step + 1, "world_size": trainkit.get_context().get_world_size()},
                        checkpoint=trainkit.Checkpoint.from_directory(d))

def test_local_runs_resume_in_the_tests_storage(local_training, tmp_storage, tmp_path):
    rc = trainkit.RunConfig(name="resumable")
    first = local_training(train_fn, {"steps": 2, "tmp": str(tmp_path / "a")}, run_config=rc)
    second = local_training(train_fn, {"steps": 2, "tmp": str(tmp_path / "b")}, run_config=rc)
    assert first.metrics == {"step": 2, "world_size": 1}
    assert second.metrics["step"] == 4
    assert first.path == second.path == os.path.join(tmp_storage, "resumable")
    print("KEPT?", first.path)

def test_a_failing_local_run_keeps_its_folder(local_training, tmp_path):
    def boom(config):
        trainkit.report({"step": 1})
        raise ValueError("the loss went to NaN")
    local_training(boom)
"""


def test_local_training_resumes_and_failing_runs_get_a_report_section(pytester):
    pytester.makepyfile(LOCAL_SUITE)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*- trainkit run -*",
        "run folder: */test_a_failing_local_run_keeps_its_folder-*-run1",
        "*failed*",
        "*rank 0*ValueError: the loss went to NaN*",
    ])
    kept = re.findall(r"KEPT\? (\S+)", result.stdout.str())[0]
    failed_run = [line.split(": ", 1)[1] for line in result.stdout.lines if line.startswith("run folder: ")][0]
    import os

    assert not os.path.exists(kept), "a passing test's run folder must be deleted without --trainkit-keep-runs"
    assert os.path.exists(os.path.join(failed_run, "events.jsonl")), "a failing test's run folder must be kept"


def test_keep_runs_keeps_passing_tests_run_folders(pytester):
    pytester.makepyfile(LOCAL_SUITE)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", "--trainkit-keep-runs",
                                "-k", "resume")
    result.assert_outcomes(passed=1)
    kept = re.findall(r"KEPT\? (\S+)", result.stdout.str())[0]
    import os

    assert os.path.exists(os.path.join(kept, "run_state.json"))


def test_fake_rows_are_seeded_and_have_ids(pytester):
    pytester.makepyfile("""
        def test_rows(fake_rows):
            rows = fake_rows(50)
            assert [r["id"] for r in rows] == list(range(50))
            assert rows == fake_rows(50), "the default seed is stable within a test"
            assert fake_rows(5, seed=1) == fake_rows(5, seed=1) != fake_rows(5, seed=2)
            assert set(rows[0]) == {"id", "name", "email", "city", "age", "score", "label"}
            assert all(18 <= r["age"] <= 90 and r["label"] in (0, 1) for r in rows)
            assert set(fake_rows(3, fields=("score",))[0]) == {"id", "score"}
            print("FIRST", rows[0]["name"])

        def test_other_test_other_rows(fake_rows):
            print("FIRST", fake_rows(50)[0]["name"])

        def test_bad_arguments(fake_rows):
            import pytest, trainkit
            with pytest.raises(trainkit.ConfigError, match="fake_rows"):
                fake_rows(-1)
            with pytest.raises(trainkit.ConfigError, match="names from"):
                fake_rows(2, fields=("salary",))
    """)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=3)
    names = re.findall(r"FIRST ([^\n]+)", result.stdout.str())
    names_again = re.findall(r"FIRST ([^\n]+)", pytester.runpytest("-s").stdout.str())
    assert len(names) == 2 and names == names_again and names[0] != names[1]


def test_tmp_storage_is_fresh_absolute_and_per_test(pytester):
    pytester.makepyfile("""
        import os
        seen = []

        def test_a(tmp_storage):
            assert os.path.isabs(tmp_storage) and os.listdir(tmp_storage) == []
            assert os.environ["TRAINKIT_STORAGE_PATH"] != tmp_storage  # only run fixtures set the default
            seen.append(tmp_storage)

        def test_b(tmp_storage, local_training):
            assert os.environ["TRAINKIT_STORAGE_PATH"] == tmp_storage
            assert tmp_storage not in seen
    """)
    pytester.runpytest().assert_outcomes(passed=2)
