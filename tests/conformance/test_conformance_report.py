"""The conformance suite's own bookkeeping, without running it: the case registry, the table, the JSON.

Pure logic (no Ray, no training): imports the case modules, renders a table from records.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import conformance
from conformance.case import CATEGORIES, REGISTRY, case
from conformance.report import OUTCOMES, render_table, summarize, to_json, write_json


@pytest.fixture(scope="module")
def registry():
    for mod in pkgutil.iter_modules(conformance.__path__):
        if mod.name.startswith("test_"):
            importlib.import_module(f"conformance.{mod.name}")
    return dict(REGISTRY)


def test_the_suite_has_at_least_40_cases_covering_every_category(registry):
    assert len(registry) >= 40
    assert {c.category for c in registry.values()} == set(CATEGORIES)


def test_every_case_has_an_id_a_category_and_a_one_sentence_statement(registry):
    for cid, info in registry.items():
        assert info.id == cid
        assert info.statement.endswith("."), cid
        body = info.statement[:-1].replace("e.g.", "eg").replace("...", "")
        assert ". " not in body, f"{cid}: the statement is more than one sentence: {info.statement}"


def test_every_ray_train_divergence_states_ray_trains_behaviour(registry):
    for info in registry.values():
        for d in info.divergences:
            assert d.reason.startswith("Ray Train 2.60"), f"{info.id}: {d.reason}"


def test_case_ids_and_categories_are_checked():
    with pytest.raises(ValueError, match="PREFIX-NNN"):
        case("report-1", "report", "X.")
    with pytest.raises(ValueError, match="category"):
        case("ZZZ-001", "nonsense", "X.")


_RECORDS = [
    {"id": "API-001", "category": "API surface", "outcome": "passed", "reason": ""},
    {"id": "REPORT-003", "category": "report barrier", "outcome": "xfailed",
     "reason": "Ray Train 2.60 hangs forever"},
    {"id": "REPORT-001", "category": "report barrier", "outcome": "failed",
     "reason": "ConformanceFailure: REPORT-001 broken: report() returns ..."},
    {"id": "ELASTIC-001", "category": "elastic", "outcome": "skipped", "reason": "missing capability: elastic"},
]


def test_summary_counts_outcomes_per_category_in_contract_order():
    table = summarize(_RECORDS)
    assert list(table) == ["API surface", "report barrier", "elastic"]
    assert table["report barrier"] == {**{o: 0 for o in OUTCOMES}, "failed": 1, "xfailed": 1}


def test_table_shows_counts_and_the_reason_of_every_case_that_did_not_pass():
    text = render_table(_RECORDS, "demo")
    assert "backend demo" in text
    assert "report barrier" in text and "elastic" in text
    assert "REPORT-003" in text and "Ray Train 2.60 hangs forever" in text
    assert "missing capability: elastic" in text
    assert "API-001" not in text  # passed cases are counted, not listed
    total = next(line for line in text.splitlines() if "total" in line)
    assert [int(x) for x in total.replace("│", " ").split()[1:]] == [1, 1, 1, 0, 1]


def test_json_document_has_the_published_fields(tmp_path, capsys):
    doc = to_json("demo", "trainkit 0.1.0", _RECORDS)
    assert set(doc) == {"backend", "version", "cases"}
    assert all(set(c) == {"id", "category", "outcome", "reason"} for c in doc["cases"])
    out = tmp_path / "report.json"
    write_json(doc, str(out))
    assert json.loads(out.read_text()) == doc
    write_json(doc, "-")
    assert json.loads(capsys.readouterr().out) == doc


# -- divergences are checked, not declared -------------------------------------------------------
def _div(**kw):
    from conformance.case import Divergence

    return Divergence("ray_train", "Ray Train 2.60 does X.", **kw)


def _info():
    from conformance.case import CaseInfo

    return CaseInfo("ZZZ-900", "report", "X.")


def test_a_divergence_is_xfailed_only_for_its_documented_exception_and_message():
    from conformance.conftest import _check_divergence

    with pytest.raises(pytest.xfail.Exception):
        _check_divergence(_info(), _div(match="metrics is None"), AssertionError("Result.metrics is None"))
    with pytest.raises(pytest.xfail.Exception):
        _check_divergence(_info(), _div(raises="CaseTimeout"), __import__("conformance.harness").harness.CaseTimeout(5))


def test_an_adapter_crash_or_another_message_is_not_taken_for_the_divergence():
    from conformance.conftest import DivergenceMismatch, _check_divergence

    with pytest.raises(DivergenceMismatch, match="TypeError"):
        _check_divergence(_info(), _div(), TypeError("adapter bug"))
    with pytest.raises(DivergenceMismatch, match="metrics is None"):
        _check_divergence(_info(), _div(match="metrics is None"), AssertionError("Result.metrics is {}"))


def test_a_pass_of_a_divergent_case_fails_unless_the_divergence_is_a_race():
    from conformance.conftest import DivergenceMismatch, _check_divergence

    with pytest.raises(DivergenceMismatch, match="divergence is gone"):
        _check_divergence(_info(), _div(), None)
    _check_divergence(_info(), _div(racy=True), None)  # a documented race may go the rule's way


def test_only_local_certifies_shared_cases_and_local_mode_cases_reach_only_backends_that_run_local_mode():
    from conformance.case import CaseInfo

    class B:
        def __init__(self, name, local):
            self.name, self.handles_local_mode = name, local

    shared = CaseInfo("API-900", "api", "X.", shared=True)
    local = CaseInfo("LOCAL-900", "local", "X.")
    plain = CaseInfo("REPORT-900", "report", "X.")
    assert shared.reaches(B("local", True)) and not shared.reaches(B("ray", False))
    assert not shared.reaches(B("ray_train", True))
    assert local.reaches(B("ray_train", True)) and not local.reaches(B("ray", False))
    assert plain.reaches(B("ray", False))
