"""The mutation check's fixed CI sample: each sampled mutant of the ``ray`` backend is killed by the
cases expected to see it, on an unmutated baseline that passes them.

The sample (``conformance.mutants.SAMPLE``) is run as ``benchmarks/bench_mutation.py --sample``
runs it: every mutant in a temporary copy of the tree, its cases in a bounded subprocess whose
imports (Ray workers included, checked by the baseline's probe) come from the copy. Only the
expected cases run, and the four runs (baseline and three mutants) run two at a time: each is
mostly the start of a private Ray, and four at once starved the other xdist worker's tests on 2 cores. The installed code is never changed (checked at the end).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from conformance.mutants import BY_NAME, SAMPLE, check_all
from conformance.mutants import run as mrun
from conformance.mutants.catalog import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def _digest(paths) -> str:
    h = hashlib.sha256()
    for rel in sorted(set(paths)):
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()


def test_every_mutant_of_the_catalog_applies_to_this_tree():
    assert check_all() == []


def test_each_sampled_mutant_is_killed_by_its_expected_cases():
    sample = [dataclasses.replace(BY_NAME[n], cases=BY_NAME[n].expect) for n in SAMPLE]
    assert all(m.expect for m in sample)
    before = _digest(m.path for m in sample)
    base = mrun.snapshot()
    try:
        with ThreadPoolExecutor(2) as pool:
            baseline = pool.submit(mrun.baseline, base, sample, timeout_s=300)
            runs = {m.name: pool.submit(mrun.run_mutant, base, m, timeout_s=300) for m in sample}
            results = {name: f.result() for name, f in runs.items()}
            base_res = baseline.result()  # BaselineError: the expected cases fail without a mutant
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert base_res.probe and base_res.probe["ok"], base_res.probe  # Ray workers imported the copy
    for m in sample:
        r = results[m.name]
        assert r.status == "killed", f"{m.name}: {r.killed_by_text()}"
        assert set(r.killed_by) == set(m.expect), f"{m.name} was killed by {r.killed_by}, expected {m.expect}"
    assert _digest(m.path for m in sample) == before, "a mutant touched the installed code"
