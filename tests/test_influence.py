"""Tests for ufm.attribution.tracin: TracIn self-influence against captum, a per-example loop and
hand-derived answers; checkpoint selection and ranking known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ufm.attribution.grad_norms import outer_sq_norm
from ufm.attribution.tracin import (
    rank_by_self_influence,
    self_influence,
    top_bottom,
    tracin_checkpoints,
)
from ufm.core.models import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _checkpoints(make, k: int, *, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    """k state dicts of freshly initialised models, with non-trivial BN running statistics."""
    out = []
    for _ in range(k):
        m = make().to(dtype)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
        out.append({n: v.detach().clone() for n, v in m.state_dict().items()})
    return out


def _loop_self_influence(model, checkpoints, lrs, x, y, params_of=None) -> torch.Tensor:
    """Reference: one autograd call per example and checkpoint."""
    model.eval()
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for state, lr in zip(checkpoints, lrs):
        model.load_state_dict(state)
        params = list(model.parameters()) if params_of is None else params_of(model)
        for n in range(x.shape[0]):
            loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out[n] += lr * sum(g.double().square().sum() for g in grads if g is not None)
    return out


# ------------------------------------------------------------------------------------------
# agreement with captum's TracInCP
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,batchnorm,layer_names", [
    ("mlp", False, None),
    ("mlp", False, ["5"]),          # only the last Linear
    ("cnn1", False, None),
    ("cnn1", False, ["0", "10"]),   # first conv and last Linear
    ("cnn1", True, None),           # BatchNorm layers: the vmap fallback
])
def test_matches_captum_tracincp(tmp_path, arch, batchnorm, layer_names):
    from captum.influence import TracInCP

    make = lambda: build_model(arch, 1, (12, 12), 10, batchnorm=batchnorm)  # noqa: E731
    model = make().eval()   # captum does not switch modes; ufm scores in eval mode
    if layer_names is not None:
        # make sure the names point where intended
        assert all(isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d)) for n in layer_names)
    states = _checkpoints(make, 3)
    lrs = [0.1, 0.5, 2.0]
    paths = []
    for i, (state, lr) in enumerate(zip(states, lrs)):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save({"state": state, "lr": lr}, path)
        paths.append(str(path))

    def load(m, path):
        blob = torch.load(path, weights_only=True)
        m.load_state_dict(blob["state"])
        return blob["lr"]

    x = torch.rand(64, 1, 12, 12)
    y = torch.randint(0, 10, (64,))
    tracin = TracInCP(model, torch.utils.data.TensorDataset(x, y), paths,
                      checkpoints_load_func=load, layers=layer_names,
                      loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=64,
                      sample_wise_grads_per_batch=False)
    expected = tracin.self_influence((x, y), outer_loop_by_checkpoints=True)

    layers = None if layer_names is None else [model.get_submodule(n) for n in layer_names]
    got = self_influence(model, states, x, y, learning_rates=lrs, layers=layers, batch_size=24)
    assert got.shape == (64,) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected.double(), rtol=1e-4, atol=1e-7)
    # module names work too, like captum's
    by_name = self_influence(model, states, x, y, learning_rates=lrs, layers=layer_names)
    torch.testing.assert_close(by_name, got, rtol=1e-5, atol=1e-8)


def test_checkpoint_paths_equal_state_dicts(tmp_path):
    make = lambda: build_model("mlp", 1, (6, 6), 3)  # noqa: E731
    states = _checkpoints(make, 2)
    paths = []
    for i, s in enumerate(states):
        torch.save(s, tmp_path / f"c{i}.pt")
        paths.append(tmp_path / f"c{i}.pt")
    x, y = torch.rand(10, 1, 6, 6), torch.randint(0, 3, (10,))
    model = make()
    a = self_influence(model, states, x, y, learning_rates=[1.0, 3.0])
    b = self_influence(model, paths, x, y, learning_rates=[1.0, 3.0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# agreement with a plain per-example loop (float64, so agreement is to ~1e-12)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,batchnorm", [("mlp", False), ("cnn1", False), ("cnn1", True),
                                            ("cnn2", True), ("mlp", True)])
def test_matches_loop_for_paper_architectures(arch, batchnorm):
    make = lambda: build_model(arch, 1, (16, 16), 5, batchnorm=batchnorm, dropout=0.3)  # noqa
    states = _checkpoints(make, 2, dtype=torch.float64)
    model = make().double()
    x = torch.rand(11, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (11,))
    got = self_influence(model, states, x, y, learning_rates=[0.3, 1.7], batch_size=4)
    want = _loop_self_influence(model, states, [0.3, 1.7], x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_layer_subset_only_last_linear():
    make = lambda: build_model("cnn1", 1, (10, 10), 4)  # noqa: E731
    states = _checkpoints(make, 2, dtype=torch.float64)
    model = make().double()
    x, y = torch.rand(9, 1, 10, 10, dtype=torch.float64), torch.randint(0, 4, (9,))
    last = model[-1]
    got = self_influence(model, states, x, y, layers=[last])
    want = _loop_self_influence(model, states, [1.0, 1.0], x, y,
                                params_of=lambda m: list(m[-1].parameters()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    everything = self_influence(model, states, x, y)
    assert bool((everything > got).all())   # more parameters, larger norm


class _ConvNet(nn.Module):
    def __init__(self, c_in, c_out, k, stride, padding, dilation, groups, bias, mode, hw):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
        with torch.no_grad():
            n_out = self.conv(torch.zeros(1, c_in, *hw)).numel()
        self.fc = nn.Linear(n_out, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    groups=st.sampled_from([1, 2]),
    c_per_group=st.integers(1, 2),
    o_per_group=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    mode=st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
    h=st.integers(5, 8),
    w=st.integers(5, 8),
)
def test_conv2d_matches_loop(n, groups, c_per_group, o_per_group, k, stride, padding, dilation,
                             bias, mode, h, w):
    c_in, c_out = groups * c_per_group, groups * o_per_group
    make = lambda: _ConvNet(c_in, c_out, k, stride, padding, dilation, groups, bias,  # noqa
                            mode, (h, w)).double()
    states = _checkpoints(make, 1, dtype=torch.float64)
    model = make()
    x = torch.rand(n, c_in, h, w, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    got = self_influence(model, states, x, y, learning_rates=[0.7])
    want = _loop_self_influence(model, states, [0.7], x, y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_conv2d_same_padding_and_gram_branch():
    # 1x1 conv with many channels on a 2x2 map: T * (D + O) < D * O, so the Gram form runs.
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 40, 3, padding="same"), nn.ReLU(),
        nn.Conv2d(40, 40, 1, stride=2), nn.Flatten(), nn.Linear(40 * 2 * 2, 4)).double()
    states = _checkpoints(make, 1, dtype=torch.float64)
    model = make()
    x, y = torch.rand(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    torch.testing.assert_close(self_influence(model, states, x, y),
                               _loop_self_influence(model, states, [1.0], x, y),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["gram", "materialise", None])
def test_outer_sq_norm_forms_agree(method):
    a = torch.randn(4, 7, 5, dtype=torch.float64)
    b = torch.randn(4, 7, 3, dtype=torch.float64)
    want = torch.stack([(b[i].T @ a[i]).square().sum() for i in range(4)])
    torch.testing.assert_close(outer_sq_norm(a, b, method), want)
    with pytest.raises(ValueError, match="method"):
        outer_sq_norm(a, b, "svd")


class _Tokens(nn.Module):
    """A Linear on (N, T, D) inputs, a Linear and a LayerNorm each called twice (weight
    sharing), and an in-place ReLU after a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)
        self.tok = nn.Linear(2, 6)
        self.shared = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu(self.bn(x))                     # (N, 2, H, W)
        h = self.tok(h.flatten(2).transpose(1, 2))    # (N, T, 6): a Linear over T positions
        h = h.mean(1)
        h = self.norm(torch.tanh(self.shared(h)))
        h = self.norm(torch.tanh(self.shared(h)))     # second call of the same modules
        return self.head(h)


def test_token_linear_weight_sharing_inplace_relu():
    make = lambda: _Tokens().double()  # noqa: E731
    states = _checkpoints(make, 2, dtype=torch.float64)
    model = make()
    x, y = torch.randn(7, 2, 3, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = self_influence(model, states, x, y, learning_rates=[2.0, 0.5], batch_size=3)
    want = _loop_self_influence(model, states, [2.0, 0.5], x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# known answer by hand
# ------------------------------------------------------------------------------------------


def test_one_dimensional_linear_known_answer():
    # logits z = (x, -x) for weight (1, -1), bias 0. With x = ln(3)/2 the softmax is
    # p = (3/4, 1/4). d CE / dz = p - e_y; dW = (p - e_y) x; db = p - e_y, so
    # ||g||^2 = (x^2 + 1) ||p - e_y||^2: (x^2 + 1) / 8 for y = 0 and (x^2 + 1) * 9 / 8 for y = 1.
    model = nn.Linear(1, 2)
    state = {"weight": torch.tensor([[1.0], [-1.0]]), "bias": torch.zeros(2)}
    x0 = math.log(3.0) / 2
    x = torch.tensor([[x0], [x0]])
    y = torch.tensor([0, 1])
    got = self_influence(model, [state, state], x, y, learning_rates=[0.5, 1.5])
    base = x0 ** 2 + 1.0
    want = torch.tensor([base / 8, base * 9 / 8], dtype=torch.float64) * (0.5 + 1.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------
# hygiene and errors
# ------------------------------------------------------------------------------------------


def test_model_is_left_as_found():
    model = build_model("cnn1", 1, (8, 8), 3, dropout=0.2, batchnorm=True)
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = _checkpoints(lambda: build_model("cnn1", 1, (8, 8), 3, dropout=0.2,
                                              batchnorm=True), 2)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,))
    self_influence(model, states, x, y, layers=[model[0], model[-1]])
    assert model.training
    assert not model[0].weight.requires_grad and model[-1].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_after_error():
    model = build_model("mlp", 1, (4, 4), 3)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 7])   # label 7 out of range
    with pytest.raises(ValueError, match="labels y must be < the 3 classes"):
        self_influence(model, [model.state_dict()], x, y)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs,match", [
    (dict(checkpoints=[]), "checkpoints is empty"),
    (dict(checkpoints="model.pt"), "wrap it in a list"),
    (dict(learning_rates=[1.0, 2.0]), "learning_rates has 2 values for 1 checkpoints"),
    (dict(learning_rates=[-1.0]), "finite and > 0"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(y=torch.zeros(4, dtype=torch.long)), r"y must have shape \(3,\)"),
    (dict(y=torch.zeros(3)), "integer class labels"),
    (dict(layers=[nn.Linear(2, 2)]), "not a submodule"),
    (dict(layers=["nope"]), "no submodule named 'nope'"),
    (dict(layers=[nn.Flatten()]), "not a submodule"),
    (dict(layers=["0"]), "hold no parameters"),
])
def test_bad_arguments(kwargs, match):
    model = build_model("mlp", 1, (4, 4), 3)
    args = dict(checkpoints=[model.state_dict()], x=torch.rand(3, 1, 4, 4),
                y=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        self_influence(model, args.pop("checkpoints"), args.pop("x"), args.pop("y"), **args)


def test_checkpoint_that_does_not_fit():
    model = build_model("mlp", 1, (4, 4), 3)
    other = build_model("mlp", 1, (5, 5), 3).state_dict()
    with pytest.raises(ValueError, match=r"checkpoints\[0\] does not fit the model"):
        self_influence(model, [other], torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------
# checkpoint choice, ranking
# ------------------------------------------------------------------------------------------


def test_tracin_checkpoints_known_answers():
    # drop 2.0 -> 0.1 = 1.9; 95% of it is reached when loss <= 0.195: index 4
    losses = [2.0, 1.0, 0.5, 0.2, 0.1, 0.1, 0.1]
    assert tracin_checkpoints(losses, n=3) == [0, 2, 4]
    assert tracin_checkpoints(losses, n=10) == [0, 1, 2, 3, 4]      # fewer available
    assert tracin_checkpoints(losses, n=1) == [4]
    assert tracin_checkpoints(losses, n=2, reduction=0.5) == [0, 1]  # 1.0 <= 1.05 at index 1
    # linear decrease 20, 19, ..., 0: 95% of the drop (19) is reached at index 19;
    # 19 * k / 9 for k = 0..9 rounds (half up) to these
    linear = [20.0 - i for i in range(21)]
    assert tracin_checkpoints(linear) == [0, 2, 4, 6, 8, 11, 13, 15, 17, 19]
    assert tracin_checkpoints(linear, reduction=1.0)[-1] == 20
    # a loss that goes up again: the minimum counts, the span ends at the first crossing
    assert tracin_checkpoints([1.0, 0.0, 5.0, 0.0], n=4) == [0, 1]


def test_tracin_checkpoints_evenly_spaced_in_steps():
    # checkpoints every 10 steps up to 40, then (after thinning) every 20, then every 40
    steps = [0, 10, 20, 30, 40, 60, 80, 100, 140, 180]
    falling = [10.0 - i for i in range(10)]  # monotone: 100% of the drop at index 9 (step 180)
    # targets 0, 60, 120, 180: 60 is kept (index 5); 120 lies halfway between 100 and 140 -> the earlier
    assert tracin_checkpoints(falling, n=4, reduction=1.0, steps=steps) == [0, 5, 7, 9]
    # the same curve indexed as if evenly spaced would pick by index, not by step
    assert tracin_checkpoints(falling, n=4, reduction=1.0) == [0, 3, 6, 9]
    # a plateau after the drop: the span ends where 95% of the drop is first reached (step 40)
    plateau = [2.0, 1.0, 0.5, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert tracin_checkpoints(plateau, n=3, steps=steps) == [0, 2, 4]
    # nearest kept checkpoints may coincide: they never repeat, and stay in step order
    crowded = [0, 1, 2, 3, 100]
    picked = tracin_checkpoints([5.0, 4.0, 3.0, 2.0, 1.0], n=4, reduction=1.0, steps=crowded)
    assert picked == [0, 2, 3, 4] and len(set(picked)) == 4
    # too few checkpoints up to the span's end: all of them
    assert tracin_checkpoints(plateau, n=6, steps=steps) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="strictly increasing"):
        tracin_checkpoints([2.0, 1.0, 0.5], steps=[0, 5, 5])
    with pytest.raises(ValueError, match="one step per checkpoint"):
        tracin_checkpoints([2.0, 1.0, 0.5], steps=[0, 5])


@pytest.mark.parametrize("losses,kwargs,match", [
    ([1.0], {}, ">= 2 checkpoints"),
    ([1.0, float("nan")], {}, "finite"),
    ([1.0, 0.5], dict(n=0), "n must be an int >= 1"),
    ([1.0, 0.5], dict(reduction=0.0), r"reduction must be in \(0, 1\]"),
    ([1.0, 0.5], dict(reduction=1.5), r"reduction must be in \(0, 1\]"),
    ([1.0, 1.0, 2.0], {}, "never fell"),
])
def test_tracin_checkpoints_errors(losses, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tracin_checkpoints(losses, **kwargs)


def test_rank_and_top_bottom_known_answers():
    scores = torch.tensor([0.3, 5.0, -1.0, 2.0, 2.0])
    order, ranks = rank_by_self_influence(scores)
    assert order.tolist() == [1, 3, 4, 0, 2]          # ties keep index order
    assert ranks.tolist() == [3, 0, 4, 1, 2]
    assert torch.equal(order[ranks], torch.arange(5))
    top, bottom = top_bottom(scores, k_top=2, k_bottom=2)
    assert top.tolist() == [1, 3] and bottom.tolist() == [2, 0]
    top, bottom = top_bottom([1.0, 2.0], k_top=0, k_bottom=1)
    assert top.tolist() == [] and bottom.tolist() == [0]
    with pytest.raises(ValueError, match="exceeds the 5 scores"):
        top_bottom(scores, k_top=3, k_bottom=3)
    with pytest.raises(ValueError, match="k_top must be an int >= 0"):
        top_bottom(scores, k_top=-1)
    with pytest.raises(ValueError, match="NaN"):
        rank_by_self_influence(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        rank_by_self_influence(torch.ones(2, 2))


def test_model_on_another_device():
    model = build_model("mlp", 1, (4, 4), 3).to("meta")
    with pytest.raises(ValueError, match=r"call model.to\(x.device\)"):
        self_influence(model, [{}], torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path):
    # float64 so that TF32 convolutions cannot blur the comparison; checkpoints stay on the
    # CPU (a state dict and a file) and are copied onto the GPU when loaded.
    make = lambda: build_model("cnn1", 1, (12, 12), 4, batchnorm=True).double()  # noqa: E731
    states = _checkpoints(make, 2, dtype=torch.float64)
    torch.save(states[1], tmp_path / "c1.pt")
    model = make()
    x, y = torch.rand(40, 1, 12, 12, dtype=torch.float64), torch.randint(0, 4, (40,))
    cpu = self_influence(model, states, x, y, learning_rates=[0.5, 2.0])
    gpu = self_influence(model.cuda(), [states[0], tmp_path / "c1.pt"], x.cuda(), y.cuda(),
                         learning_rates=[0.5, 2.0])
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-12)
