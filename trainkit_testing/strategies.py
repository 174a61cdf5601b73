"""Hypothesis strategies for training-loop tests: scaling configs here, fault schedules re-exported.

``fault_schedules`` is written by the fault-injection package
(``fault_injection.strategies``) and re-exported lazily, so importing this module
imports neither Hypothesis' consumers' heavy parts nor the fault-injection layer.
Runs in the pytest process.

>>> from hypothesis import given
>>> from trainkit_testing.strategies import scaling_configs
>>> @given(scaling_configs(max_workers=4))
... def test_any_shape(sc):
...     assert 1 <= sc.max_workers <= 4
"""

from __future__ import annotations

from typing import Any

__all__ = ["num_workers", "scaling_configs", "fault_schedules", "trust_schedules"]


def num_workers(max_workers: int = 4, *, elastic: bool = True, local: bool = False):
    """Values for ``ScalingConfig.num_workers``: ints 1..max (0 too with ``local``), and ``(min, max)`` tuples."""
    from hypothesis import strategies as st

    from trainkit.errors import ConfigError

    if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
        raise ConfigError("num_workers(max_workers)", max_workers, "an int >= 1")
    fixed = st.integers(min_value=0 if local else 1, max_value=max_workers)
    if not elastic:
        return fixed
    ranges = st.integers(1, max_workers).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, max_workers)))
    return st.one_of(fixed, ranges)


def scaling_configs(max_workers: int = 4, *, elastic: bool = True, local: bool = False,
                    placement_strategies: tuple = ("PACK", "SPREAD")):
    """Valid ``trainkit.ScalingConfig`` values (CPU only) for up to ``max_workers`` ranks.

    ``elastic`` adds ``(min, max)`` worker ranges; ``local`` adds ``num_workers=0``;
    ``placement_strategies`` lists the strategies to draw from (STRICT_* need as many nodes).
    """
    from hypothesis import strategies as st

    from trainkit import ScalingConfig

    return st.builds(ScalingConfig, num_workers=num_workers(max_workers, elastic=elastic, local=local),
                     placement_strategy=st.sampled_from(tuple(placement_strategies)))


def trust_schedules(kinds: tuple = ()):
    """``(kind, params)`` schedules of ``trainkit_testing.trust``: storage faults (a full disk, an object
    store's quota, torn and refused PUTs), exceptions, a killed driver, a second driver; run one with
    ``trust.run_schedule(kind, params, workdir)``. ``kinds`` narrows the fault kinds (default: all)."""
    import random

    from hypothesis import strategies as st

    from trainkit_testing import trust

    pool = tuple(kinds) or trust.KINDS
    return st.tuples(st.sampled_from(pool), st.integers(0, 2**32 - 1)).map(
        lambda t: (t[0], trust.draw(random.Random(t[1]), t[0])))


def __getattr__(name: str) -> Any:
    if name == "fault_schedules":
        from fault_injection.strategies import fault_schedules

        return fault_schedules
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
