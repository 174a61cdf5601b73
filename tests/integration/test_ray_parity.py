"""Name and signature parity with the installed Ray Train (generated from its modules, not listed by hand).

For each public module of ``ray.train`` (its ``__all__``), the trainkit module of the same role
must export every name, and every callable must accept every parameter Ray's accepts, under
the same name (keyword parameters) and, for functions, at the same position; and a callable takes
no ``**kwargs`` where Ray's takes none (a misspelt keyword raises ``TypeError``, as in Ray). Enums must have
Ray's members, constants Ray's values, and classes Ray's public methods and properties, with
the same parameters. A missing name or parameter fails with the full list of what is missing.

The few deliberate differences are listed in ``_DIFFERENCES`` with their reason, and written in
docs/api.md ("Differences from Ray Train 2.60"). Skipped when ``ray.train`` cannot be imported;
a framework module (``ray.train.lightning``, ``ray.train.huggingface.transformers``) is skipped
while its framework, or trainkit's module for it, is not importable.
"""

from __future__ import annotations

import enum
import importlib
import inspect

import pytest

pytestmark = pytest.mark.integration

MODULES = [
    ("ray.train", "trainkit"),
    ("ray.train.torch", "trainkit.torch"),
    ("ray.train.collective", "trainkit.collective"),
    ("ray.train.lightning", "trainkit.lightning"),
    ("ray.train.huggingface.transformers", "trainkit.huggingface.transformers"),
]

_EXCEPTION_ARGS = ("trainkit's run errors are built from WorkerFailure records (trainkit.errors) that pickle and "
                   "are restored by Result.from_path; user code catches them, it does not construct them")
_FIELD_ORDER = ("a config dataclass: trainkit keeps its fields in its own order (Ray's puts the deprecated "
                "trainer_resources first); pass config fields by keyword")

# (ray module, name[, member]) -> why trainkit differs on purpose. "args": the constructor's parameters are not
# compared; "order": parameter names are compared, positions not; "member:<m>": that member may be missing.
_DIFFERENCES = {
    ("ray.train", "TrainingFailedError", "args"): _EXCEPTION_ARGS,
    ("ray.train", "WorkerGroupError", "args"): _EXCEPTION_ARGS,
    ("ray.train", "ControllerError", "args"): _EXCEPTION_ARGS,
    ("ray.train", "NCCLHangError", "args"): _EXCEPTION_ARGS,
    ("ray.train", "PreemptionError", "args"): _EXCEPTION_ARGS + " (preemption_info and drain_timed_out are keywords)",
    ("ray.train", "ScalingConfig", "order"): _FIELD_ORDER,
    ("ray.train", "RunConfig", "order"): _FIELD_ORDER,
    ("ray.train", "FailureConfig", "order"): _FIELD_ORDER,
    ("ray.train.torch", "TorchConfig", "order"): _FIELD_ORDER,
    # ScalingConfig's derived values are trainkit's own (worker_resources, min_workers, ...): Ray's private-ish helpers
    ("ray.train", "ScalingConfig", "member:as_placement_group_factory"): "a Ray Tune helper; trainkit places "
                                                                          "workers itself",
    ("ray.train", "ScalingConfig", "member:from_placement_group_factory"): "a Ray Tune helper",
    ("ray.train", "ScalingConfig", "member:additional_resources_per_worker"): "Ray internals",
    ("ray.train", "ScalingConfig", "member:elasticity_enabled"): "trainkit's name is ScalingConfig.elastic",
    ("ray.train", "ScalingConfig", "member:num_cpus_per_worker"): "trainkit: worker_resources['CPU']",
    ("ray.train", "ScalingConfig", "member:num_gpus_per_worker"): "trainkit: worker_resources['GPU']",
    ("ray.train", "ScalingConfig", "member:num_tpus_per_worker"): "no TPUs",
    ("ray.train", "ScalingConfig", "member:total_resources"): "trainkit: worker_resources x max_workers",
    ("ray.train", "ScalingConfig", "member:bundle_label_selector"): "Ray internals",
    ("ray.train", "ScalingConfig", "member:to_dict"): "trainkit configs are dataclasses: dataclasses.asdict",
    ("ray.train", "RunConfig", "member:storage_context"): "Ray internals (trainkit: TrainContext.get_storage())",
}
_BACKEND_PLUGIN = ("Ray's backend plug-in internals (which class sets the framework up in each worker); trainkit "
                   "backends are registered by name instead (trainkit.backends.api)")
for _mod, _cls in (("ray.train", "BackendConfig"), ("ray.train.torch", "TorchConfig")):
    for _m in ("backend_cls", "framework", "train_func_context"):
        _DIFFERENCES[(_mod, _cls, f"member:{_m}")] = _BACKEND_PLUGIN
for _m in ("configure", "default_ingest_options"):
    _DIFFERENCES[("ray.train", "DataConfig", f"member:{_m}")] = (
        "Ray's DeveloperAPI for custom Ray Data ingest (a DataConfig subclass overriding configure()); trainkit "
        "builds each rank's shard itself (trainkit.data)")


def _ray_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:  # includes ModuleNotFoundError of the framework ray's module imports
        pytest.skip(f"{name} is not importable here ({e}); parity against it is checked where it is")


def _params(obj):
    try:
        return inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None


def _signature_problems(where: str, ray_obj, tk_obj, *, check_order: bool) -> list[str]:
    ray_params, tk_params = _params(ray_obj), _params(tk_obj)
    if ray_params is None:
        return []
    if tk_params is None:
        return [f"{where}: has no inspectable signature"]
    problems = []
    ray_pos = [n for n, p in ray_params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    tk_pos = [n for n, p in tk_params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    tk_var_pos = any(p.kind is p.VAR_POSITIONAL for p in tk_params.values())
    for name, p in ray_params.items():
        if name.startswith("_") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue  # Ray's private parameters (Result._storage_filesystem) and catch-alls
        if name not in tk_params:
            problems.append(f"{where}: no parameter {name!r}")
            continue
        tp = tk_params[name]
        if p.kind is not p.KEYWORD_ONLY and tp.kind is tp.KEYWORD_ONLY:
            problems.append(f"{where}: {name!r} is keyword-only, Ray's can be passed by position")
        if p.default is p.empty and tp.default is not tp.empty:
            continue  # trainkit's is optional where Ray's is required: accepts more
        if p.default is not p.empty and tp.default is tp.empty:
            problems.append(f"{where}: {name!r} is required, Ray's is optional")
    ray_var_kw = any(p.kind is p.VAR_KEYWORD for p in ray_params.values())
    if not ray_var_kw and any(p.kind is p.VAR_KEYWORD for p in tk_params.values()):
        problems.append(f"{where}: takes **kwargs where Ray's takes none (a misspelt keyword must raise TypeError)")
    if check_order and not tk_var_pos:
        for i, name in enumerate(ray_pos):
            if name.startswith("_"):
                break
            if i >= len(tk_pos) or tk_pos[i] != name:
                problems.append(f"{where}: positional parameter {i} is {tk_pos[i] if i < len(tk_pos) else None!r}, "
                                f"Ray's is {name!r}")
                break
    return problems


def _own_members(cls) -> dict:
    """Public members a class defines itself or inherits from Ray's own classes (not object/Exception/Enum)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ in ("builtins", "enum", "typing", "abc") or klass is object:
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                out[name] = value
    return out


def _class_problems(ray_mod: str, name: str, ray_cls, tk_cls) -> list[str]:
    where = f"{ray_mod}.{name}"
    if not inspect.isclass(tk_cls):
        return [f"{where}: trainkit's is not a class"]
    if issubclass(ray_cls, enum.Enum):
        if not issubclass(tk_cls, enum.Enum):
            return [f"{where}: trainkit's is not an Enum"]
        missing = sorted({m.name for m in ray_cls} - {m.name for m in tk_cls})
        wrong = sorted(m.name for m in ray_cls if m.name in tk_cls.__members__ and tk_cls[m.name].value != m.value)
        return ([f"{where}: no member {m}" for m in missing] + [f"{where}.{m}: another value" for m in wrong])
    problems = []
    if (ray_mod, name, "args") not in _DIFFERENCES and not issubclass(ray_cls, BaseException):
        problems += _signature_problems(where, ray_cls, tk_cls, check_order=(ray_mod, name, "order") not in _DIFFERENCES)
    elif issubclass(ray_cls, BaseException) and (ray_mod, name, "args") not in _DIFFERENCES:
        problems += _signature_problems(where, ray_cls, tk_cls, check_order=True)
    if issubclass(ray_cls, BaseException) or getattr(ray_cls, "_is_protocol", False):
        return problems  # exception attributes: the tree's own (worker_failures, ...); a Protocol is a type
    tk_members = {n for n in dir(tk_cls) if not n.startswith("_")}
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ray_cls)} if dataclasses.is_dataclass(ray_cls) else set()
    for member, value in sorted(_own_members(ray_cls).items()):
        if member in fields:
            continue  # a dataclass field: compared as a constructor parameter
        if (ray_mod, name, f"member:{member}") in _DIFFERENCES and member not in tk_members:
            continue
        if member not in tk_members:
            problems.append(f"{where}: no member {member!r}")
            continue
        raw = inspect.getattr_static(tk_cls, member)
        if callable(value) and not isinstance(value, (property, type)):
            ray_fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            tk_fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
            if callable(tk_fn):
                problems += _signature_problems(f"{where}.{member}", ray_fn, tk_fn, check_order=True)
    return problems


def _name_problems(ray_mod: str, tk_module, name: str, ray_obj) -> list[str]:
    if not hasattr(tk_module, name):
        return [f"{ray_mod}.{name}: missing from {tk_module.__name__}"]
    tk_obj = getattr(tk_module, name)
    if inspect.isclass(ray_obj):
        return _class_problems(ray_mod, name, ray_obj, tk_obj)
    if callable(ray_obj):
        return _signature_problems(f"{ray_mod}.{name}", ray_obj, tk_obj, check_order=True)
    if isinstance(ray_obj, (str, int, float)) and tk_obj != ray_obj:
        return [f"{ray_mod}.{name}: {tk_obj!r}, Ray's is {ray_obj!r}"]
    return []


@pytest.mark.parametrize("ray_name,tk_name", MODULES, ids=[m for m, _ in MODULES])
def test_every_public_name_and_parameter_of_ray_train_is_in_trainkit(ray_name, tk_name):
    ray_module = _ray_module(ray_name)
    try:
        tk_module = importlib.import_module(tk_name)
    except ImportError as e:
        if tk_name in ("trainkit.lightning", "trainkit.huggingface.transformers"):
            pytest.skip(f"{tk_name} is not importable yet ({e}): its parity is checked once it is")
        raise
    names = getattr(ray_module, "__all__", None) or [n for n in dir(ray_module) if not n.startswith("_")]
    problems = []
    for name in sorted(names):
        problems += _name_problems(ray_name, tk_module, name, getattr(ray_module, name))
    assert problems == [], "\n".join(problems)


def test_the_parity_check_finds_a_missing_name_and_a_missing_parameter():
    """The check itself: a module without a name, and a function without a Ray parameter, are found."""
    import types

    import ray.train

    fake = types.ModuleType("fake")
    fake.report = lambda metrics, checkpoint=None: None  # no checkpoint_dir_name, no upload mode, ...
    assert _name_problems("ray.train", fake, "get_checkpoint", ray.train.get_checkpoint) == [
        "ray.train.get_checkpoint: missing from fake"]
    problems = _name_problems("ray.train", fake, "report", ray.train.report)
    assert "ray.train.report: no parameter 'checkpoint_upload_mode'" in problems
    assert "ray.train.report: no parameter 'validation'" in problems
