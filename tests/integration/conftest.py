"""Fixtures for the integration tests that need a real Ray: the plugin's session cluster.

``ray_up`` is the pytest plugin's ``trainkit_cluster`` (``trainkit_testing.cluster``): one
real local Ray with virtual nodes for the whole session, shared by the xdist workers under
``pytest -n N``, with its own ``RAY_TMPDIR`` so that it never joins or collides with another
Ray on the machine, and the moto endpoint (``s3_storage``) in the environment of every Ray
process. The modules that use it declare the shape they need with the plugin's marker,
``@pytest.mark.trainkit(workers=4, nodes=1)``: one node with room for four ranks per test
process (the plugin multiplies the CPUs by the number of xdist workers). At the end of the session the plugin releases the warm worker groups, shuts
Ray down, and fails the last test (teardown error) if a process of the cluster outlived it.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def ray_up(trainkit_cluster):
    """The session's cluster, this process connected to it as the driver (again, when a module's
    private ``trainkit_testing.cluster.Cluster`` disconnected it)."""
    trainkit_cluster.connect()
    return trainkit_cluster


@pytest.fixture(scope="module")
def three_nodes():
    """A module's private cluster: a head with no CPUs and three 1-CPU virtual nodes, fast GCS
    health checks so a removed node is noticed in about a second. Yields (the
    ``ray.cluster_utils.Cluster``, its three nodes): what a test removes and adds nodes with.
    The elastic tests use it, never the session's shared cluster."""
    from trainkit_testing.cluster import Cluster

    with Cluster(nodes=3, cpus_per_node=1) as c:
        yield c.ray_cluster, c.virtual_nodes
