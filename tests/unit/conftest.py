"""The unit tier is Ray-free: a test here that imports Ray fails, naming the tier's rule."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_ray_in_the_unit_tier(request):
    had_ray = "ray" in sys.modules
    yield
    if not had_ray and "ray" in sys.modules and request.node.get_closest_marker("integration") is None:
        pytest.fail("a unit test imported ray: the unit tier is Ray-free (move the test to tests/integration, "
                    "or mark it @pytest.mark.integration)", pytrace=False)
