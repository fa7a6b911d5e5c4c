"""Starting Ray in a test: in CI (env ``CI`` set) a Ray that cannot be imported or started FAILS the
run, so a broken Ray executor is seen; on a developer's machine it skips with the reason."""

import os

import pytest


def start_ray(num_cpus: int = 2):
    """``ray`` after ``ray.init(num_cpus=...)`` (no dashboard); fails in CI, skips elsewhere."""
    try:
        import ray
    except ImportError as e:
        _cannot(f"ray is not installed (pip install 'ufm[ray]'): {e}")
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - any start failure means: Ray cannot be tested here
        _cannot(f"ray could not start here: {e}")
    return ray


def _cannot(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: a Ray executor that cannot start fails the run)", pytrace=False)
    pytest.skip(reason)
