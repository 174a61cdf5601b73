"""The mutation catalog names cases (``PERSIST-003``); the suite runs their storage variants
(``PERSIST-003[local]``, ``PERSIST-003[s3]``). ``with_rollups`` gives each case one outcome."""

import pytest

from conformance.mutants.run import with_rollups

pytestmark = pytest.mark.unit


def test_a_case_passes_only_when_every_variant_passed():
    out = with_rollups({"PERSIST-003[local]": ("passed", ""), "PERSIST-003[s3]": ("passed", "")})
    assert out["PERSIST-003"] == ("passed", "")
    assert out["PERSIST-003[s3]"] == ("passed", "")  # the variants stay


def test_one_failed_variant_fails_the_case_and_names_the_variant():
    out = with_rollups({"DUR-002[local]": ("passed", ""), "DUR-002[s3]": ("failed", "DUR-002 broken: lost")})
    assert out["DUR-002"] == ("failed", "DUR-002[s3]: DUR-002 broken: lost")


def test_a_skipped_variant_is_not_a_pass():
    out = with_rollups({"DUR-002[local]": ("passed", ""), "DUR-002[s3]": ("skipped", "no moto")})
    assert out["DUR-002"] == ("skipped", "DUR-002[s3]: no moto")


def test_plain_cases_are_left_as_they_are():
    cases = {"FAIL-005": ("failed", "x"), "REPORT-001": ("passed", "")}
    assert with_rollups(cases) == cases
