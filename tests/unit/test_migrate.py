"""``trainkit.migrate.rewrite``: the import swap on tokens, for both import styles, never inside strings
or comments, idempotent; the command's --check/--diff modes."""

from __future__ import annotations

import pytest

from trainkit.migrate import main, rewrite

pytestmark = pytest.mark.unit


def _new(src: str) -> str:
    out, _ = rewrite(src)
    compile(out, "<migrated>", "exec")
    assert rewrite(out)[1] == [], "a second rewrite changes nothing"
    return out


def test_import_ray_then_ray_train_attributes_gets_an_import_of_trainkit():
    out = _new("import ray\n\ndef f(config):\n    ray.train.report({'a': 1})\n    ds = ray.data.range(3)\n")
    assert out == "import ray\nimport trainkit\n\ndef f(config):\n    trainkit.report({'a': 1})\n" \
                  "    ds = ray.data.range(3)\n"


def test_import_ray_train_torch_style_of_the_getting_started_guide():
    out = _new("import ray.train.torch\nm = ray.train.torch.prepare_model(m)\nray.train.report({}, "
               "checkpoint=ray.train.Checkpoint.from_directory('d'))\n")
    assert out == "import trainkit.torch\nm = trainkit.torch.prepare_model(m)\ntrainkit.report({}, " \
                  "checkpoint=trainkit.Checkpoint.from_directory('d'))\n"


@pytest.mark.parametrize("src,expected", [
    ("from ray.train import ScalingConfig, RunConfig\n", "from trainkit import ScalingConfig, RunConfig\n"),
    ("from ray.train.torch import TorchTrainer\n", "from trainkit.torch import TorchTrainer\n"),
    ("from ray.train import (ScalingConfig,\n    RunConfig)\n", "from trainkit import (ScalingConfig,\n    RunConfig)\n"),
    ("from ray.train.lightning import RayDDPStrategy\n", "from trainkit.lightning import RayDDPStrategy\n"),
    ("from ray.train.huggingface.transformers import prepare_trainer\n",
     "from trainkit.huggingface.transformers import prepare_trainer\n"),
    ("import ray.train.torch as rt\n", "import trainkit.torch as rt\n"),
    ("from ray import train\ntrain.report({})\n", "import trainkit as train\ntrain.report({})\n"),
    ("from ray import tune, train as t\n", "from ray import tune\nimport trainkit as t\n"),
])
def test_import_forms(src, expected):
    assert _new(src) == expected


def test_strings_comments_and_lookalike_names_are_left_alone():
    src = "import os\nray_train = 'ray.train.report'  # ray.train in a comment\nx.ray.train = 1\n"
    assert rewrite(src) == (src, [])


def test_import_ray_train_keeps_ray_bound_when_the_file_still_uses_ray():
    out = _new("import ray.train\nds = ray.data.range(4)\nray.train.report({})\n")
    assert out == "import ray\nimport trainkit\nds = ray.data.range(4)\ntrainkit.report({})\n"
    assert _new("import ray.train\nray.train.report({})\n") == "import trainkit\ntrainkit.report({})\n"


def test_an_import_inside_a_function_gets_its_trainkit_import_at_the_same_indentation():
    assert _new("def g():\n    import ray\n    return ray.train.get_context()\n") == \
        "def g():\n    import ray\n    import trainkit\n    return trainkit.get_context()\n"


def test_ray_train_used_without_an_import_of_ray_gets_the_import_after_the_docstring():
    assert _new('"""doc"""\nfrom __future__ import annotations\nx = ray.train.report\n') == \
        '"""doc"""\nfrom __future__ import annotations\nimport trainkit\nx = trainkit.report\n'


def test_the_changes_name_their_lines():
    _, changes = rewrite("import os\nimport ray.train\n")
    assert [(c.line, c.before, c.after) for c in changes] == [(2, "import ray.train", "import trainkit")]


def test_the_command_rewrites_in_place_and_check_and_diff_write_nothing(tmp_path, capsys):
    f = tmp_path / "train.py"
    f.write_text("import ray\nray.train.report({})\n")
    assert main(["--check", str(f)]) == 1
    assert main(["--diff", str(f)]) == 0
    assert "+import trainkit" in capsys.readouterr().out
    assert f.read_text() == "import ray\nray.train.report({})\n"
    assert main([str(f)]) == 0
    assert f.read_text() == "import ray\nimport trainkit\ntrainkit.report({})\n"
    assert main(["--check", str(f)]) == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_the_command_names_a_file_it_cannot_read(tmp_path, capsys):
    assert main([str(tmp_path / "missing.py")]) == 2
    assert "missing.py" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n  '''unterminated\n")
    assert main([str(bad)]) == 2
