"""A fixed sample of the generated fault schedules of ``benchmarks/bench_fault_schedules.py``: full
disks, torn and refused PUTs (moto), exceptions, killed drivers, a second driver; after each, one
clean fit resumes the run. Nothing acknowledged is lost and no run folder is left corrupted."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from trainkit_testing import trust
from trainkit_testing.strategies import trust_schedules

pytestmark = [pytest.mark.property, pytest.mark.timeout(600)]

SEED = 20261202
SAMPLE = 14


@pytest.fixture(scope="module")
def moto_env():
    from trainkit_testing.s3 import AWS_UNSET, MotoS3

    server = MotoS3().start()
    mp = pytest.MonkeyPatch()
    for k, v in server.env.items():
        mp.setenv(k, v)
    for k in AWS_UNSET:
        mp.delenv(k, raising=False)
    try:
        yield server
    finally:
        mp.undo()
        server.stop()


@pytest.mark.parametrize("i,kind,params", [(i, k, p) for i, (k, p) in enumerate(trust.schedules(SAMPLE, SEED))],
                         ids=[f"{i}-{k}" for i, (k, _) in enumerate(trust.schedules(SAMPLE, SEED))])
def test_a_generated_fault_loses_nothing_acknowledged_and_leaves_the_run_intact(i, kind, params, tmp_path, moto_env,
                                                                                monkeypatch):
    monkeypatch.setenv("TRAINKIT_PROGRESS", "0")
    s3_root = f"s3://{moto_env.create_bucket('trust')}/runs" if kind == "put_fail" else None
    out = trust.run_schedule(kind, params, str(tmp_path), s3_root=s3_root)
    if out.skipped:
        pytest.skip(out.skipped)
    assert out.lost == [], f"{kind} {params}: acknowledged checkpoints lost: {out.lost}"
    assert out.corrupted == [], f"{kind} {params}: {out.corrupted}"
    assert out.resumed_from is not None and out.resumed_from >= max(out.acked, default=0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=trust_schedules(kinds=("disk_full", "enospc", "torn", "raise")))
def test_generated_storage_faults_lose_nothing(schedule, tmp_path_factory):
    kind, params = schedule
    out = trust.run_schedule(kind, params, str(tmp_path_factory.mktemp("trust")))
    if out.skipped:
        return
    assert out.lost == [] and out.corrupted == [], f"{kind} {params}: lost {out.lost}; {out.corrupted}"
