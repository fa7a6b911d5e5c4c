"""Science on the real MNIST subset: a positive control must be memorised, clean models must not be."""

import pytest

from ufm.core.canary import CanaryChoice
from ufm.core.experiment import ExperimentConfig, run_experiment

pytestmark = pytest.mark.slow


def _cfg(shared_data, **kw):
    return ExperimentConfig(dataset="mnist", data_dir=str(shared_data), arch="mlp", train_size=3000,
                            device="cpu", **kw)


def test_positive_control_feature_on_100_images_of_one_class(shared_data):
    res = run_experiment(_cfg(shared_data, canary=CanaryChoice("class", (), count=100, label=0), seed=0))
    assert res.M > 0 and res.score.p_value < 0.01 and res.score.p_value_paired < 0.01
    assert res.score.significant and res.score.rank == 1
    # every access setting points at the class that carried the feature
    assert res.access.white_box.gain > 0 and res.access.grey_box.label == 0 and res.access.black_box_gain.label == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_model_is_not_significant_by_exposure(shared_data, seed):
    res = run_experiment(_cfg(shared_data, canary=CanaryChoice("none", ()), seed=seed))
    assert not res.score.significant, res.score.verdict()
    assert res.test_accuracy > 0.85
