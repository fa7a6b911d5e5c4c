import json

import numpy as np
import pytest

from ufm.core import experiment as E
from ufm.core.canary import CanaryChoice
from ufm.core.experiment import ExperimentConfig, Result, run_experiment
from ufm.core.features import glyph, text_feature
from ufm.core.train import DPConfig, TrainingCancelled

from .conftest import tiny_config


def _tiny_config(tiny_data, **kw):
    return tiny_config(tiny_data, **{"ood_size": 40, "epochs": 4, "candidates": 9, **kw})


def test_config_json_round_trip_and_key():
    cfg = ExperimentConfig(feature=text_feature("JOHN DOE", 7, offset=(2, 3)), regularisers=("dropout", "augment"),
                           canary=CanaryChoice("class", (), count=5, label=3), dp=DPConfig(None, 2.0),
                           train_size=500, seed=7, data_dir="/somewhere")
    back = ExperimentConfig.from_json(cfg.to_json())
    assert back == cfg and hash(back) == hash(cfg)
    assert back.regularisers == ("augment", "dropout")  # normalised order
    assert cfg.key() == cfg.replace(data_dir="/elsewhere").key()
    assert cfg.key() != cfg.replace(seed=8).key()


@pytest.mark.parametrize("kw, msg", [
    (dict(arch="vgg"), "unknown architecture"),
    (dict(regularisers=("mixup",)), "unknown regulariser"),
    (dict(regularisers=("dp-sgd", "batchnorm")), "batch norm"),
    (dict(arch="densenet100", regularisers=("dp-sgd",)), "densenet100"),
    (dict(candidate_kind="zzz"), "candidate kind"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ExperimentConfig(**kw)
    with pytest.raises(ValueError, match="unknown config keys"):
        ExperimentConfig.from_dict({"bogus": 1})


def test_paper_defaults():
    cfg = ExperimentConfig()
    assert cfg.feature == glyph("A") and cfg.epochs == 500 and cfg.patience == 10
    assert (cfg.learning_rate, cfg.effective_batch_size) == (1e-4, 128)
    c2 = ExperimentConfig(arch="cnn2")
    assert (c2.learning_rate, c2.effective_batch_size) == (3e-4, 512)


def test_run_on_tiny_data_and_result_round_trip(tiny_data):
    phases = []
    res = run_experiment(_tiny_config(tiny_data), progress=lambda p: phases.append(p.phase))
    assert phases[0] == "data" and "train" in phases and phases[-1] == "done"
    assert res.canary_indices == [0] and res.epochs_trained <= 4 and 0 <= res.test_accuracy <= 1
    assert len(res.score.d_u) == 40 and res.score.d_r.shape == (1, 40)
    d = json.loads(res.to_json())
    for k in ("config", "M", "X_u", "X_r", "p_value", "p_value_paired", "exposure", "exposure_p_value",
              "d_u", "d_r", "canary_indices", "test_accuracy", "epochs_trained"):
        assert k in d
    back = Result.from_json(res.to_json())
    assert back.M == res.M and back.config == res.config and back.history == res.history


def test_same_config_and_seed_give_identical_numbers(tiny_data):
    cfg = _tiny_config(tiny_data, regularisers=("dropout", "augment"))
    a = run_experiment(cfg)
    E._cached_split.cache_clear()
    E._cached_ood.cache_clear()
    b = run_experiment(cfg)
    assert a.M == b.M
    np.testing.assert_array_equal(a.score.d_u, b.score.d_u)
    c = run_experiment(cfg.replace(seed=1))
    assert c.M != a.M


def test_canary_is_stamped_and_stays_in_training(tiny_data):
    cfg = _tiny_config(tiny_data, canary=CanaryChoice("class", (), count=5, label=1))
    data = E.prepare_data(cfg)
    assert len(data.canary_indices) == 5 and set(data.canary_indices) <= set(data.train_indices)
    pos = {int(i): k for k, i in enumerate(data.train_indices)}
    for i in data.canary_indices:
        np.testing.assert_array_equal(data.train.x[pos[int(i)], 0, 0:3, 0:3].numpy(), glyph("A", size=3).array())
    assert (data.train.y[[pos[int(i)] for i in data.canary_indices]] == 1).all()


def test_feature_larger_than_image_is_refused(tiny_data):
    with pytest.raises(ValueError, match="larger than the 12x12"):
        run_experiment(_tiny_config(tiny_data, feature=glyph("A", size=13)))


def test_cancel_before_training(tiny_data):
    with pytest.raises(TrainingCancelled):
        run_experiment(_tiny_config(tiny_data), cancel=lambda: True)


def test_dp_sgd_experiment_records_epsilon(tiny_data):
    res = run_experiment(_tiny_config(tiny_data, regularisers=("dp-sgd",), epochs=2))
    assert res.epsilon is not None and res.epsilon > 0


def test_a_model_that_did_not_learn_gets_an_inconclusive_verdict(tiny_data, one_torch_thread):
    """The audit's lr = 1e6 case: a dead model must not read as 'no evidence of memorisation'."""
    from ufm.core.experiment import run_experiment
    from ufm.runs.store import result_summary
    from ufm.measure.verdict import decide

    res = run_experiment(tiny_config(tiny_data, lr=1e-9, epochs=1))
    assert not res.learned and "did not learn" in res.learned_note
    v = decide(result_summary(res))
    assert v.status == "inconclusive" and "did not learn" in v.text
    learned = run_experiment(tiny_config(tiny_data, epochs=4, patience=4))
    assert learned.learned and result_summary(learned)["learned"] is True


def test_keys_and_json_of_runs_without_audit_unchanged():
    """The audit field is left out when None: keys and saved configs are those of the code before
    it existed (pins computed at commit 65f0a2f, tests/fixtures/privacy_audit_0_pre_engine)."""
    import json
    from pathlib import Path

    from ufm.core.canary import CanaryChoice
    from ufm.core.features import glyph

    pins = json.loads((Path(__file__).parent / "fixtures" / "privacy_audit_0_pre_engine" / "pins.json").read_text())
    fixed = ExperimentConfig(feature=glyph("X", size=5, offset=(2, 3)), dataset="mnist", arch="cnn1",
                             regularisers=("dropout", "weight-decay"), epochs=7, train_size=500, seed=3,
                             canary=CanaryChoice("index", (1, 4)))
    assert fixed.key() == pins["key_fixed"] and ExperimentConfig().key() == pins["key_default"]
    assert fixed.to_json(sort_keys=True) == pins["json_fixed"]
    assert ExperimentConfig.from_json(fixed.to_json()) == fixed


def test_audit_config_round_trips_and_refuses_a_canary():
    from ufm.core.audit_canaries import AuditCanaries
    from ufm.core.canary import CanaryChoice

    cfg = ExperimentConfig(canary=CanaryChoice("none", ()), audit=AuditCanaries(canaries=30, score="M"))
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg and cfg.key() != cfg.replace(audit=None).key()
    with pytest.raises(ValueError, match="canary mode 'none'"):
        ExperimentConfig(audit=AuditCanaries(canaries=30))
