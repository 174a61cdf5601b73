"""Training functions pickled for workers keep their real file names, whatever cloudpickle writes.

cloudpickle 3.1.3 replaced every code object's ``co_filename`` with ``"<dynamic-code>"`` when it
pickles a function by value; these tests run against the installed cloudpickle and against a
code reducer that behaves like 3.1.3's, on every kind of code object a training function carries.
"""

import importlib.util
import sys
import textwrap
import types

import cloudpickle
import pytest

from trainkit import _serialize

USER_MODULE = '''
def helper(x):
    return [i * x for i in range(3)]  # a comprehension: its own code object before 3.12


def train_func(config):
    def inner(y):
        return (lambda z: z + 1)(y)
    return inner(helper(config["x"])[-1])
'''


@pytest.fixture
def user_module(tmp_path):
    """A module that workers could not import (like a test file), loaded under a unique name."""
    path = tmp_path / "my_training_script.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    name = f"my_training_script_{tmp_path.name}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def _code_objects(fn):
    """Every code object reachable from fn: its own, nested ones, and those of globals it calls."""
    seen, todo = [], [fn.__code__]
    todo += [g.__code__ for g in fn.__globals__.values() if isinstance(g, types.FunctionType)
             and g.__module__ == fn.__module__]
    while todo:
        code = todo.pop()
        if code in seen:
            continue
        seen.append(code)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return seen


def _filenames_and_lines(fn):
    return sorted((c.co_name, c.co_filename, c.co_firstlineno) for c in _code_objects(fn))


def _like_cloudpickle_3_1_3(original):
    """A code reducer that writes "<dynamic-code>" for co_filename, as cloudpickle 3.1.3 does."""
    def reduce(code):
        constructor, args = original(code)
        return constructor, tuple("<dynamic-code>" if a is code.co_filename else a for a in args)
    return reduce


def test_a_function_pickled_by_value_keeps_its_file_and_lines_with_the_installed_cloudpickle(user_module):
    fn = user_module.train_func
    loaded = _serialize.loads_train_fn(_serialize.dumps_train_fn(fn))

    assert loaded is not fn and loaded({"x": 2}) == fn({"x": 2}) == 5
    assert _filenames_and_lines(loaded) == _filenames_and_lines(fn)
    assert {f for _, f, _ in _filenames_and_lines(loaded)} == {user_module.__file__}


def test_file_names_survive_a_pickler_that_writes_dynamic_code(user_module, monkeypatch):
    original = cloudpickle.Pickler.dispatch_table[types.CodeType]
    broken = _like_cloudpickle_3_1_3(original)
    monkeypatch.setitem(cloudpickle.Pickler.dispatch_table, types.CodeType, broken)
    monkeypatch.setattr(_serialize, "_cloudpickle_code_reduce", broken)
    fn = user_module.train_func

    # The failure this guards against: plain cloudpickle with 3.1.3's reducer loses the file.
    cloudpickle.register_pickle_by_value(user_module)
    try:
        plain = cloudpickle.loads(cloudpickle.dumps(fn))
    finally:
        cloudpickle.unregister_pickle_by_value(user_module)
    assert plain.__code__.co_filename == "<dynamic-code>"

    loaded = _serialize.loads_train_fn(_serialize.dumps_train_fn(fn))
    assert _filenames_and_lines(loaded) == _filenames_and_lines(fn)
    assert loaded({"x": 1}) == 3


def test_a_traceback_from_the_rebuilt_function_names_the_real_file_and_line(user_module):
    import traceback

    loaded = _serialize.loads_train_fn(_serialize.dumps_train_fn(user_module.train_func))
    with pytest.raises(TypeError) as info:
        loaded({"x": None})
    frames = traceback.extract_tb(info.value.__traceback__)
    user_frames = [f for f in frames if f.filename == user_module.__file__]
    assert [f.name for f in user_frames][:2] == ["train_func", "helper"]
    assert user_frames[1].line == 'return [i * x for i in range(3)]  # a comprehension: its own code object before 3.12'


def test_library_functions_are_pickled_by_reference():
    from trainkit import workloads

    data = _serialize.dumps_train_fn(workloads.counter)
    assert _serialize.loads_train_fn(data) is workloads.counter
