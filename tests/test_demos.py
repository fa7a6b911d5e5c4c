"""The teaching demo end to end on real MNIST: its two rungs for 2 seeds, the reference bank included."""

from __future__ import annotations

import pytest
import torch

from ufm.measure.demos import ATYPICAL, TYPICAL, plan_demo
from ufm.runs.jobs import measure
from ufm.measure.bank import reference_test
from ufm.runs.banks import build_bank
from ufm.runs.store import Store

from .conftest import needs_shared


@pytest.mark.slow
@needs_shared
def test_teaching_demo_calls_the_atypical_canary_memorised(tmp_path, shared_data):
    """The phenomenon the demo exists to show: with the A on the most self-influential digit the
    calibrated verdict says memorised (the map: 10 of 10 seeds), for seeds 0 and 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the models are tiny: one thread is faster than two that spin-wait
    try:
        plan = plan_demo("teaching", "cpu", str(shared_data))
        store = Store(tmp_path / "home")
        assert len(build_bank(store, plan.base)) == 39
        for seed in (0, 1):
            verdicts = {}
            for rung, cfg in zip(plan.rungs, plan.configs(seed)):
                _, res, _ = measure(store, cfg)
                assert res.learned and res.canary_indices == list(rung.canary.indices)
                ref = reference_test(store, cfg, res.M)
                assert ref is not None and ref.references == 39
                verdicts[rung.label] = (ref.memorised, ref.p_value, res.M)
            assert verdicts[ATYPICAL][0], verdicts  # beats all 39 reference models: p = 0.025
            assert verdicts[ATYPICAL][2] > verdicts[TYPICAL][2], verdicts
    finally:
        torch.set_num_threads(threads)
