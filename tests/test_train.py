import threading

import numpy as np
import pytest
import torch

from ufm.core.data import ImageData
from ufm.core.models import build_model
from ufm.core.train import (DPConfig, TrainConfig, TrainingCancelled, TrainingDiverged, augment_batch,
                       resolve_device, train)


def _blobs(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 10, 10, generator=g) * 0.2
    for c in range(3):
        x[y == c, :, 2 + 2 * c:4 + 2 * c, 3:7] = 1.0
    return ImageData(x, y, ("a", "b", "c"), "blobs")


def _mlp():
    return build_model("mlp", 1, (10, 10), 3)


def test_learns_and_restores_best_weights():
    data, val = _blobs(), _blobs(90, seed=1)
    events = []
    res = train(_mlp(), data, val, TrainConfig(lr=1e-3, batch_size=32, max_epochs=40, patience=3), progress=events.append)
    assert res.history[-1].val_acc > 0.9 or min(h.val_loss for h in res.history) < 0.3
    best = min(res.history, key=lambda h: h.val_loss)
    assert res.best_epoch == best.epoch
    from ufm.core.train import evaluate
    assert evaluate(res.model, val)[0] == pytest.approx(best.val_loss, rel=1e-5)
    assert len(events) == res.epochs_trained and events[0].phase == "train"


def test_early_stopping_stops_after_patience():
    data = _blobs()
    noise = ImageData(torch.rand(60, 1, 10, 10), torch.randint(0, 3, (60,)), ("a", "b", "c"), "noise")
    res = train(_mlp(), data, noise, TrainConfig(lr=1e-2, batch_size=32, max_epochs=200, patience=2))
    assert res.stopped == "early_stopping" and res.epochs_trained == res.best_epoch + 2


def test_same_seed_same_weights_different_seed_differs():
    def run(seed):
        torch.manual_seed(seed)
        r = train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(lr=1e-3, batch_size=32, max_epochs=3, seed=seed,
                                                                augment=True))
        return torch.cat([p.flatten() for p in r.model.parameters()])
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_cancel_flag_stops_training():
    ev = threading.Event()
    ev.set()
    with pytest.raises(TrainingCancelled):
        train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(max_epochs=5), cancel=ev)
    calls = []
    with pytest.raises(TrainingCancelled):
        train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(max_epochs=50, batch_size=16),
              cancel=lambda: calls.append(1) or len(calls) > 20)


def test_nan_loss_is_reported_with_a_fix():
    data = _blobs()
    data.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train(_mlp(), data, _blobs(60, 1), TrainConfig(max_epochs=3))


def test_checkpoints_for_tracin():
    res = train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(lr=1e-3, batch_size=40, max_epochs=3, patience=5,
                                                             checkpoint_every=3))
    steps = [c.step for c in res.checkpoints]
    assert steps == [0, 3, 6, 9, 12, 15, 18]  # 6 steps per epoch x 3 epochs, plus the initial weights
    assert res.checkpoints[0].train_loss == pytest.approx(np.log(3), abs=0.3)
    # every checkpoint's loss is the eval-mode loss of its own weights on the training images
    from ufm.core.train import evaluate
    model = _mlp()
    for c in res.checkpoints:
        model.load_state_dict(c.state_dict)
        assert c.train_loss == pytest.approx(evaluate(model, _blobs())[0], rel=1e-5)
    assert not torch.equal(res.checkpoints[0].state_dict["1.weight"], res.checkpoints[-1].state_dict["1.weight"])
    thinned = train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(lr=1e-3, batch_size=40, max_epochs=3, patience=5,
                                                                 checkpoint_every=1, max_checkpoints=8))
    assert [c.step for c in thinned.checkpoints] == [0, 4, 8, 12, 16]  # halved twice, still evenly spaced
    per_epoch = train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(max_epochs=2, batch_size=40, checkpoint_every=-1))
    assert [c.epoch for c in per_epoch.checkpoints] == [0.0, 1.0, 2.0]


def test_augment_batch_known_shift():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1
    gen = torch.Generator().manual_seed(0)
    outs = [augment_batch(x, shift=1, hflip=False, generator=gen) for _ in range(40)]
    positions = {tuple(torch.nonzero(o[0, 0])[0].tolist()) for o in outs}
    assert positions <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(positions) >= 6
    assert all(o.sum() == 1 for o in outs)
    flipped = augment_batch(torch.arange(4.0).view(1, 1, 1, 4).repeat(64, 1, 1, 1), shift=0, hflip=True,
                            generator=torch.Generator().manual_seed(0))
    assert 0 < (flipped[:, 0, 0, 0] == 3).sum() < 64


def test_dp_sgd_trains_and_reports_epsilon():
    res = train(_mlp(), _blobs(), _blobs(60, 1), TrainConfig(lr=1e-3, batch_size=32, max_epochs=2,
                                                             dp=DPConfig(noise_multiplier=1.0)))
    assert res.epsilon is not None and 0 < res.epsilon < 100
    assert not hasattr(res.model, "_module")  # the Opacus wrapper is removed


def test_dp_sgd_runs_the_epoch_budget_and_spends_the_target_epsilon():
    """No early stopping under DP: a validation set that only gets worse (noise labels) would stop
    a normal run after `patience` epochs; DP trains all epochs, so the epsilon Opacus calibrated
    for `max_epochs` is the epsilon spent, and the last weights are returned."""
    noise = ImageData(torch.rand(60, 1, 10, 10), torch.randint(0, 3, (60,)), ("a", "b", "c"), "noise")
    cfg = TrainConfig(lr=1e-2, batch_size=32, max_epochs=6, patience=1,
                      dp=DPConfig(noise_multiplier=None, target_epsilon=3.0))
    res = train(_mlp(), _blobs(), noise, cfg)
    assert res.epochs_trained == 6 and res.stopped == "max_epochs" and res.best_epoch == 6
    assert res.epsilon == pytest.approx(3.0, rel=0.10)
    from ufm.core.train import evaluate
    assert evaluate(res.model, noise)[0] == pytest.approx(res.history[-1].val_loss, rel=1e-5)  # last weights
    # the same run without DP stops early and restores its best epoch
    plain = train(_mlp(), _blobs(), noise, TrainConfig(lr=1e-2, batch_size=32, max_epochs=6, patience=1))
    assert plain.stopped == "early_stopping" and plain.epochs_trained < 6


def test_dp_sgd_refuses_batchnorm_with_reason():
    model = build_model("mlp", 1, (10, 10), 3, batchnorm=True)
    with pytest.raises(ValueError, match="batch norm"):
        train(model, _blobs(), _blobs(60, 1), TrainConfig(max_epochs=1, dp=DPConfig()))
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(noise_multiplier=1.0, target_epsilon=1.0)


def test_bad_train_config_and_device():
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
