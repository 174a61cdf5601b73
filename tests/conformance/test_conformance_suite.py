"""The conformance suite run for real: on ``local`` (all it can), on the deliberately broken
backends (the expected cases fail, naming the broken rule), and a few cases on ``ray``.

Each run is a subprocess (``trainkit conformance ...`` or ``pytest conformance ...``), as a
user runs it, so its pytest session, plugins and Ray are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], timeout_s: float = 500) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRAINKIT_PROGRESS="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)


def _conformance(tmp_path, backend: str, keyword: str | None = None):
    out = tmp_path / f"{backend}.json"
    cmd = [sys.executable, "-m", "trainkit.cli", "conformance", "--backend", backend, "--json", str(out)]
    if keyword:
        cmd += ["-k", keyword]
    proc = _run(cmd)
    assert out.exists(), f"no JSON report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    return proc, doc, {c["id"]: c for c in doc["cases"]}


def test_local_backend_passes_every_case_its_capabilities_allow(tmp_path):
    proc, doc, cases = _conformance(tmp_path, "local")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert doc["backend"] == "local" and doc["version"].startswith("trainkit")
    assert len(cases) >= 40
    for cid, c in cases.items():
        assert c["outcome"] in ("passed", "skipped", "xfailed"), (cid, c)
        if c["outcome"] == "skipped":
            assert c["reason"].startswith("missing capability: multi_worker"), (cid, c)
        if c["outcome"] == "xfailed":
            assert c["reason"].startswith("pending:"), (cid, c)
    assert sum(c["outcome"] == "passed" for c in cases.values()) >= 30
    assert "trainkit conformance: backend local" in proc.stdout and "total" in proc.stdout


# Expected failures of each broken backend among the cases that the -k expression selects.
BROKEN = {
    "broken-barrier": ("report or failures or durability", {"REPORT-006", "FAIL-007", "DUR-004[local]", "DUR-004[s3]",
                                                            "DUR-007[local]", "DUR-007[s3]"}),
    "broken-checkpoints": ("checkpoints or result or persistence",
                           {"RESULT-001", "RESULT-004", "RESULT-007", "CKPT-003", "CKPT-004", "CKPT-005",
                            "CKPT-006", "CKPT-007", "CKPT-008",
                            *(f"PERSIST-00{n}[{s}]" for n in (3, 4, 5) for s in ("local", "s3"))}),
    "broken-retries": ("failures or CTX-004", {"FAIL-003", "FAIL-004", "FAIL-007", "CTX-004"}),
}


@pytest.mark.parametrize("backend", sorted(BROKEN))
def test_a_broken_backend_fails_the_expected_cases_naming_the_rule(tmp_path, backend):
    keyword, expected = BROKEN[backend]
    proc, _doc, cases = _conformance(tmp_path, backend, keyword)
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = {cid for cid, c in cases.items() if c["outcome"] == "failed"}
    assert expected <= failed, f"expected {sorted(expected - failed)} to fail on {backend}"
    for cid in failed:
        # the failure names the case and its rule, so the backend author knows what to fix
        case_id = cid.split("[", 1)[0]  # DUR-007[s3]: a variant's rule is its case's
        assert cases[cid]["reason"].startswith(f"{case_id} broken: "), cases[cid]
    assert "failed on backend " + backend in proc.stderr


def test_pytest_entry_point_prints_the_table_by_category(tmp_path):
    proc = _run([sys.executable, "-m", "pytest", "conformance", "--trainkit-backend=broken-retries", "-k",
                 "FAIL-003 or FAIL-002", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}"])
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "trainkit conformance: backend broken-retries" in proc.stdout
    assert "failures and retries" in proc.stdout
    assert "FAIL-003 broken: With max_failures=2" in proc.stdout


def test_unknown_backend_is_a_usage_error(tmp_path):
    proc = _run([sys.executable, "-m", "trainkit.cli", "conformance", "--backend", "nope"], timeout_s=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "nope" in proc.stderr


@pytest.mark.slow
def test_a_few_cases_on_the_ray_backend(tmp_path):
    proc, doc, cases = _conformance(tmp_path, "ray", "REPORT-001 or FAIL-005 or DUR-002 or FAIL-008")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {cid: c["outcome"] for cid, c in cases.items()} == {
        "REPORT-001": "passed", "FAIL-005": "passed", "DUR-002[local]": "passed", "DUR-002[s3]": "passed",
        "FAIL-008": "passed"}


def test_a_keyword_matching_no_case_is_a_usage_error(tmp_path):
    proc = _run([sys.executable, "-m", "trainkit.cli", "conformance", "--backend", "local", "-k", "NOPE-999"],
                timeout_s=120)
    assert proc.returncode == 2
    assert "no conformance case matched" in proc.stderr


def test_keyword_selects_cases_by_id(tmp_path):
    proc, _doc, cases = _conformance(tmp_path, "local", "API-001 or LOCAL-002")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert sorted(cases) == ["API-001", "LOCAL-002"]
