"""Scenario files (``version: 1``): the schema (pydantic) and a loader with file/line/key errors.

A scenario names a workload, a cluster shape, faults and expectations::

    version: 1
    name: worker_crash
    workload: {entry: "trainkit.workloads:counter", config: {steps: 8}}
    cluster: {nodes: 2, cpus_per_node: 1}
    scaling: {num_workers: 2}
    run: {max_failures: 1}
    faults:
      - {action: kill_worker, rank: 1, at: {report: 4}}
    expect: {status: finished, restarts: 1, reports: 8, no_lost_checkpoints: true}

``load_scenario(path)`` returns a ``Scenario`` or raises ``ScenarioError`` naming the
file, the line, the key path and, for a typo, the key it meant. Besides the keys' own
checks (and their bounds, ``faults.MAX_COUNT`` / ``MAX_SECONDS``) a scenario's faults must
be able to happen: a target inside the group and the cluster, and a report the workload
makes where its count is known (``known_reports``). ``docs/scenario.schema.json``
is ``Scenario.model_json_schema()`` (``python -m fault_injection.scenario --schema``).
Pure; runs in the driver.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from trainkit.errors import ScenarioError

from fault_injection import faults as F


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Workload(_Strict):
    entry: str = Field("trainkit.workloads:counter", description="the training function, `module:function`")
    config: dict[str, Any] = Field(default_factory=dict, description="its train_loop_config")

    @field_validator("entry")
    @classmethod
    def _importable(cls, v):
        resolve_entry(v)
        return v

    @model_validator(mode="after")
    def _known_config(self):
        keys = getattr(resolve_entry(self.entry), "config_keys", None)
        for k in self.config if keys else ():
            if k not in keys:
                near = _closest(k, keys) or ""
                raise _key_error(("workload", "config", k), f"unknown key for {self.entry} (it takes {', '.join(keys)})",
                                 suggestion=near)
        return self


class ClusterShape(_Strict):
    nodes: int = Field(2, ge=1, le=16, description="virtual worker nodes (the head node has no CPUs)")
    cpus_per_node: int = Field(1, ge=1, le=16, description="CPUs of each virtual node")


class Scaling(_Strict):
    num_workers: Union[int, list[int]] = Field(2, description="N, or [min, max] for an elastic group")

    @field_validator("num_workers")
    @classmethod
    def _shape(cls, v):
        if isinstance(v, list) and (len(v) != 2 or v[0] < 1 or v[0] > v[1]):
            raise ValueError("an elastic group is [min, max] with 1 <= min <= max")
        if isinstance(v, int) and v < 1:
            raise ValueError("at least 1 worker")
        return v

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


class RunSettings(_Strict):
    max_failures: int = Field(0, ge=-1, le=F.MAX_COUNT, description="FailureConfig.max_failures (-1: unlimited)")
    storage: Literal["local", "s3"] = Field("local", description="s3 starts a moto server on 127.0.0.1")
    hang_timeout_s: Optional[float] = Field(None, gt=0, le=F.MAX_SECONDS, description="HangConfig.timeout_s")
    hang_action: Literal["warn", "fail", "restart"] = Field("fail", description="HangConfig.action")


class Expect(_Strict):
    status: Optional[Literal["finished", "failed"]] = Field(None, description="how the run ends")
    restarts: Optional[int] = Field(None, ge=0, le=F.MAX_COUNT, description="group restarts (group_restarted events)")
    final_world_size: Optional[int] = Field(None, ge=1, description="world size of the last committed report")
    min_world_size: Optional[int] = Field(None, ge=1, description="smallest world size of a committed report")
    reports: Optional[int] = Field(None, ge=0, le=F.MAX_COUNT,
                                   description="the final lineage holds reports 1..N, each once")
    no_lost_checkpoints: Optional[bool] = Field(
        None, description="every attempt resumed from the latest committed checkpoint, and the manifest's "
                          "latest checkpoint is the last one committed and is in storage")
    error_contains: Optional[str] = Field(None, description="text in the run's final error")
    max_recovery_s: Optional[float] = Field(None, gt=0, le=F.MAX_SECONDS,
                                            description="from each fault to the next committed report of a "
                                                        "later attempt")

    @property
    def is_default(self) -> bool:
        """No expectation set (no ``expect:``, or an empty one): the run is judged on the defaults."""
        return all(getattr(self, k) is None for k in type(self).model_fields)


class Scenario(_Strict):
    """A chaos scenario (``version: 1``)."""

    version: Literal[1] = Field(description="scenario format version")
    name: str = Field(description="a short name; also the run's name")
    description: str = ""
    backend: Optional[str] = Field(None, description="backend to run on (default ray)")
    seed: int = Field(0, description="seed for `rank: random` targets")
    workload: Workload = Field(default_factory=Workload)
    cluster: ClusterShape = Field(default_factory=ClusterShape)
    scaling: Scaling = Field(default_factory=Scaling)
    run: RunSettings = Field(default_factory=RunSettings)
    faults: list[F.Fault] = Field(default_factory=list)
    expect: Expect = Field(default_factory=Expect, description="expectations; without any, the run must finish "
                                                               "(and, as always, every fault must fire)")

    @model_validator(mode="after")
    def _fits(self):
        capacity = self.cluster.nodes * self.cluster.cpus_per_node
        if self.scaling.max_workers > capacity and not any(f.action == "add_node" for f in self.faults):
            raise _key_error(("scaling", "num_workers"),
                             f"asks for {self.scaling.max_workers} workers but the cluster has {capacity} CPUs "
                             f"({self.cluster.nodes} nodes x {self.cluster.cpus_per_node}); "
                             "raise cluster.nodes or cluster.cpus_per_node")
        known = self.cluster.nodes + sum(1 for f in self.faults if f.action == "add_node")
        world = self.scaling.max_workers
        reports = known_reports(self.workload)
        for i, f in enumerate(self.faults):
            node = getattr(f, "node", None)
            if node is not None and node >= known:
                raise _key_error(("faults", i, "node"), f"node {node} is not in the cluster (nodes 0..{known - 1})")
            ranks = f.rank if isinstance(f.rank, list) else [f.rank] if isinstance(f.rank, int) else []
            outside = [r for r in ranks if r >= world]
            if outside:
                raise _key_error(("faults", i, "rank"), f"rank {outside[0]} is not in the group: scaling.num_workers "
                                 f"is {self.scaling.num_workers}, so world ranks are 0..{world - 1}")
            if reports is not None and f.at.report is not None and f.at.report > reports:
                raise _key_error(("faults", i, "at", "report"),
                                 f"report {f.at.report} never happens: {self.workload.entry} makes {reports} "
                                 f"report(s) (workload.config.steps); the fault would never fire")
        return self


def known_reports(workload: "Workload") -> Optional[int]:
    """How many reports the workload makes, where its config says so (counter: ``steps``); else None."""
    if workload.entry != "trainkit.workloads:counter":
        return None
    from trainkit.workloads import COUNTER_DEFAULTS

    steps = workload.config.get("steps", COUNTER_DEFAULTS["steps"])
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def resolve_entry(entry: str):
    """``module:function`` -> the function; ValueError with what is wrong."""
    mod, sep, attr = entry.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"{entry!r} is not `module:function`")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except ImportError as e:
        raise ValueError(f"cannot import {mod!r}: {e}") from None
    except AttributeError:
        raise ValueError(f"module {mod!r} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{entry!r} is not callable")
    return fn


# -- loading with file, line and key --------------------------------------------------------
def load_scenario(path: str) -> Scenario:
    """Read and validate a scenario file; ``ScenarioError`` names the file, line and key."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ScenarioError(f"cannot read the scenario: {e.strerror}", path=path) from None
    return parse_scenario(text, path)


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ScenarioError(f"not valid YAML: {getattr(e, 'problem', None) or e}", path=path,
                            line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ScenarioError("a scenario is a mapping with version, name, workload, ...", path=path, line=1)
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise _scenario_error(e, root, path, Scenario) from None


def validate_faults(faults: list) -> list:
    """Faults given as typed objects or mappings -> typed objects; ``ScenarioError`` on a bad one."""
    out = []
    adapter = TypeAdapter(F.Fault)
    for i, f in enumerate(faults):
        if isinstance(f, tuple(F.FAULT_CLASSES.values())):
            out.append(f)
            continue
        try:
            out.append(adapter.validate_python(f))
        except ValidationError as e:
            err = _scenario_error(e, None, None, None, prefix=("faults", i))
            raise ScenarioError(f"FaultPlan: {err.message}", key=err.key, suggestion=err.suggestion) from None
    return out


_KEY_ERROR = "scenario_key"


def _key_error(where: tuple, text: str, suggestion: Optional[str] = None) -> PydanticCustomError:
    """A cross-field check's error, with the key path it is about (a validator only knows its own model)."""
    return PydanticCustomError(_KEY_ERROR, "{text}", {"text": text, "where": where, "suggestion": suggestion or None})


def _scenario_error(e: ValidationError, root, path: Optional[str], model, prefix: tuple = ()) -> ScenarioError:
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = prefix + tuple(first["loc"])
    keys = _yaml_path(loc)
    key = _dotted(keys)
    suggestion = None
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        suggestion = _closest(str(loc[-1]), allowed)
        msg = f"unknown key {key!r}" + (f"; allowed here: {', '.join(sorted(allowed))}" if allowed else "")
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        got = (first.get("ctx") or {}).get("tag")
        if kind == "union_tag_not_found":
            msg = f"{key}: a fault needs `action:` (one of {', '.join(F.ACTIONS)})"
        else:
            suggestion = _closest(str(got), F.ACTIONS)
            keys = keys + ["action"]
            key = _dotted(keys)
            msg = f"{key}={got!r} is not an action; expected one of {', '.join(F.ACTIONS)}"
    elif kind == "missing":
        msg = f"{key} is required"
    elif kind in _NUMBER_ERRORS and _bounds_text(loc):
        value = first.get("input")
        msg = f"{key}={value!r}: must be {_bounds_text(loc)}"
    elif kind == _KEY_ERROR:  # a cross-field check naming its key path
        ctx = first["ctx"]
        keys = list(ctx["where"])
        key = _dotted(keys)
        suggestion = ctx["suggestion"]
        msg = f"{key}: {ctx['text']}"
    else:
        text = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        shown = f"={value!r}" if not isinstance(value, (dict, list)) and key else ""
        msg = f"{key}{shown}: {text}" if key else text
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    line = _line_of(root, keys) if root is not None else None
    return ScenarioError(msg, path=path, line=line, key=key or None, suggestion=suggestion)


def _yaml_path(loc: tuple) -> list:
    """Pydantic's location without the union tags it inserts (``faults.0.kill_worker.rank``)."""
    out = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and part in F.FAULT_CLASSES and i > 0 and isinstance(loc[i - 1], int):
            continue
        if isinstance(part, str) and part.startswith(("int", "list[", "literal[", "function-", "constrained-")):
            continue
        out.append(part)
    return out


def _dotted(keys: list) -> str:
    s = ""
    for k in keys:
        s += f"[{k}]" if isinstance(k, int) else (f".{k}" if s else str(k))
    return s


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model at ``loc`` (a location inside a Scenario)."""
    cls: Any = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part in F.FAULT_CLASSES:
            cls = F.FAULT_CLASSES[part]
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        cls = _model_in(field.annotation)
        if cls is None:
            return []
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


_NUMBER_ERRORS = {"int_parsing", "int_parsing_size", "int_from_float", "int_type", "float_parsing", "float_type",
                  "finite_number", "less_than_equal", "less_than", "greater_than", "greater_than_equal"}


def _bounds_text(loc: tuple) -> str:
    """``an integer, at least 1 and at most 1000000`` for a bounded number field at ``loc`` ('' otherwise)."""
    *parents, name = [p for p in loc if not isinstance(p, int)]
    model: Any = Scenario
    for part in parents:
        if isinstance(part, str) and part in F.FAULT_CLASSES:
            model = F.FAULT_CLASSES[part]
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return ""
    field = model.model_fields.get(name) if isinstance(model, type) and issubclass(model, BaseModel) else None
    if field is None:
        return ""
    bounds = {a: getattr(m, a) for m in field.metadata for a in ("ge", "gt", "le") if hasattr(m, a)}
    def num(v) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    words = [f"at least {num(bounds['ge'])}" if "ge" in bounds else f"more than {num(bounds['gt'])}"
             if "gt" in bounds else "", f"at most {num(bounds['le'])}" if "le" in bounds else ""]
    words = [w for w in words if w]
    if not any("most" in w for w in words):
        return ""
    kind = "an integer" if int in (field.annotation, *getattr(field.annotation, "__args__", ())) else "a number"
    return f"{kind}, {' and '.join(words)}"


def _model_in(annotation) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _closest(word: str, options) -> Optional[str]:
    hits = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return hits[0] if hits else None


def _line_of(node, keys: list) -> Optional[int]:
    """1-based line of the deepest YAML node along ``keys`` (the key itself for mapping entries)."""
    line = node.start_mark.line + 1 if node is not None else None
    for k in keys:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                if knode.value == k:
                    line = knode.start_mark.line + 1
                    node = vnode
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            node = node.value[k]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def schema_json() -> str:
    """The published JSON Schema of scenario files (docs/scenario.schema.json)."""
    schema = Scenario.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "trainkit chaos scenario (version 1)"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--schema"]:
        sys.stdout.write(schema_json())
    else:
        print("usage: python -m fault_injection.scenario --schema > docs/scenario.schema.json", file=sys.stderr)
        sys.exit(2)
