"""Hypothesis strategies of trainkit_testing.strategies (pure logic, no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trainkit
from trainkit_testing import strategies


@settings(max_examples=60, deadline=None)
@given(strategies.scaling_configs(max_workers=4))
def test_scaling_configs_are_valid_and_within_bounds(sc):
    assert isinstance(sc, trainkit.ScalingConfig)
    assert 1 <= sc.min_workers <= sc.max_workers <= 4
    assert sc.placement_strategy in ("PACK", "SPREAD")


@settings(max_examples=60, deadline=None)
@given(strategies.scaling_configs(max_workers=3, elastic=False, local=True, placement_strategies=("PACK",)))
def test_fixed_configs_include_local_mode_when_asked(sc):
    assert not sc.elastic and 0 <= sc.num_workers <= 3 and sc.placement_strategy == "PACK"


def test_both_fixed_and_elastic_shapes_are_drawn():
    seen = set()

    @settings(max_examples=100, deadline=None, database=None)
    @given(strategies.num_workers(4))
    def collect(n):
        seen.add(type(n))

    collect()
    assert seen == {int, tuple}


def test_a_bad_bound_is_a_config_error():
    with pytest.raises(trainkit.ConfigError, match=r"num_workers\(max_workers\)=0 is invalid"):
        strategies.num_workers(0)


def test_fault_schedules_is_the_fault_injection_strategy_re_exported():
    from fault_injection.strategies import fault_schedules

    assert strategies.fault_schedules is fault_schedules
    assert isinstance(strategies.fault_schedules(reports=3), st.SearchStrategy)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        strategies.nope  # noqa: B018
