"""TracIn self-influence of training examples (SPEC section 3).

Pruthi et al. (2020), "Estimating Training Data Influence by Tracing Gradient Descent",
https://arxiv.org/abs/2002.08484, define the checkpoint approximation

    TracInCP(x, x) = sum_i eta_i * || grad_w loss(w_i; x) ||^2

over saved checkpoints ``w_i`` trained with learning rate ``eta_i``. Hartley & Tsaftaris (2022)
rank every training image by this score on a model trained *without* canaries and put the
feature on the top-15 and bottom-15 images.

Computing ``||grad_w loss||^2`` for every example one at a time (what captum's ``TracInCP``
does by default) costs one backward pass per example. Here one forward and one backward pass
per *batch* are enough: forward hooks record each layer's input ``a`` and the gradient ``b`` of
the summed loss with respect to the layer's output (the "backprop"), and the per-example
squared norm follows in closed form (the "ghost norm" trick of Goodfellow 2015 and
Li et al. 2022, https://arxiv.org/abs/2110.05679):

- ``nn.Linear`` on a 2-D input: the per-example weight gradient is the outer product
  ``b_n a_n^T``, so ``||g_n||^2 = ||a_n||^2 ||b_n||^2`` (plus ``||b_n||^2`` for the bias).
- ``nn.Linear`` on ``(N, T, D)`` inputs and ``nn.Conv2d`` (input unfolded to patches
  ``A_n`` of shape ``(T, D)``, backprops ``B_n`` of shape ``(T, O)``): ``g_n = B_n^T A_n`` and
  ``||g_n||^2 = sum_{t,s} (A_n A_n^T)_{ts} (B_n B_n^T)_{ts}``. Per layer, whichever of this
  Gram form (cost ~ T^2 (D + O)) or the materialised ``B_n^T A_n`` (cost ~ T D O) is cheaper
  is used.
- Any other layer that owns parameters (BatchNorm in eval mode, LayerNorm, ...):
  ``torch.func.vmap(torch.func.grad(...))`` of that layer alone, fed the recorded inputs and
  backprops, gives exact per-example parameter gradients.

The model is scored in eval mode: dropout off, so the gradient is that of the deterministic
function the checkpoint represents; batch norm uses its running statistics, so one example's
score does not depend on which other examples share its batch. captum's ``TracInCP`` leaves the
mode to the caller, so both agree when captum is handed a model in eval mode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from ufm.attribution.grad_norms import group_by_module, squared_grad_norms

__all__ = [
    "self_influence",
    "tracin_checkpoints",
    "rank_by_self_influence",
    "top_bottom",
]

Checkpoint = Union[Mapping[str, Tensor], str, "os.PathLike[str]"]
LayerSpec = Union[nn.Module, str]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def self_influence(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    x: Tensor,
    y: Tensor,
    *,
    learning_rates: Sequence[float] | None = None,
    layers: Sequence[LayerSpec] | None = None,
    batch_size: int = 128,
) -> Tensor:
    """TracInCP self-influence ``sum_i lr_i * ||grad_w CE(model_{w_i}(x_n), y_n)||^2``.

    Args:
        model: network mapping ``x`` to logits ``(N, K)``; its parameters must live on
            ``x.device``. Each checkpoint is loaded into it in turn; its original weights,
            training flag and ``requires_grad`` flags are restored afterwards.
        checkpoints: state dicts of ``model`` (tensors), or paths to files saved with
            ``torch.save(state_dict, path)`` (read with ``weights_only=True``). At least one.
        x: inputs, ``(N, ...)`` as the model expects (images: ``(N, C, H, W)`` in [0, 1]).
        y: integer class labels, ``(N,)``, values in ``[0, K)``.
        learning_rates: ``eta_i``, one positive float per checkpoint (the learning rate in
            force while training from that checkpoint). Default: 1.0 for every checkpoint.
        layers: which parameters the gradient is taken over. ``None`` (default): every
            parameter with ``requires_grad``. Otherwise a list of submodules of ``model``
            (module objects, or their names as in ``model.named_modules()``, which is how
            captum's ``TracInCP(layers=...)`` takes them); all parameters of those modules
            count, frozen ones included.
        batch_size: examples per forward/backward pass; memory grows linearly with it. The
            default 128 keeps a cnn1 batch's activations within a CPU's last-level cache
            (measured on 2 cores, 32 MB L3: cnn1 1290 examples/s at 128 vs 790 at 256; the mlp
            is as fast at 128 as at 256); on a GPU larger batches (1024) run faster.

    Returns:
        ``(N,)`` float64 tensor on the CPU: self-influence of every example, in units of
        (learning rate) x (loss gradient)^2. Cross-entropy is in nats.

    Raises:
        ValueError: for empty ``checkpoints``, a ``learning_rates`` list of the wrong length
            or with non-positive entries, mismatched ``x`` / ``y``, labels out of range, a
            model on another device, ``layers`` that are not submodules of ``model``, or a
            checkpoint that does not fit ``model``.

    Limitations: a parameter counts through the calls of the module that owns it. A model that
    uses a parameter outside its module's ``forward`` (e.g. ``F.linear(h, self.fc.weight)``)
    or ties one parameter to two modules is not supported; the latter raises ``ValueError``.
    """
    ckpts = _check_checkpoints(checkpoints)
    lrs = _check_learning_rates(learning_rates, len(ckpts))
    _check_data(x, y)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}; e.g. 256")
    _check_model_device(model, x.device)
    params = _selected_parameters(model, layers)
    groups = group_by_module(model, params)

    n = x.shape[0]
    scores = torch.zeros(n, dtype=torch.float64, device=x.device)
    original_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in params]
    try:
        model.eval()
        # Selected parameters must require grad so that the outputs of their modules are part
        # of the autograd graph; only gradients w.r.t. those outputs are ever computed.
        for p, _ in grad_flags:
            p.requires_grad_(True)
        for i, (ckpt, lr) in enumerate(zip(ckpts, lrs)):
            _load_checkpoint(model, ckpt, x.device, i)
            for start in range(0, n, batch_size):
                sq = squared_grad_norms(model, groups, x[start:start + batch_size],
                                        y[start:start + batch_size])
                scores[start:start + batch_size] += lr * sq.to(torch.float64)
    finally:
        model.load_state_dict(original_state)
        model.train(was_training)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return scores.cpu()


def tracin_checkpoints(losses: Sequence[float], n: int = 10, reduction: float = 0.95, *,
                       steps: Sequence[int] | None = None) -> list[int]:
    """Indices of ``n`` checkpoints evenly spaced in steps over a ``reduction`` of the training loss.

    The paper takes "10 evenly spaced checkpoints which account for a 95% reduction in the
    training loss". Here the reduction is measured against the *drop actually achieved*:
    with ``L0 = losses[0]`` (index 0 = the initial weights) and ``Lmin = min(losses)``, the
    span ends at the first index ``e`` with ``losses[e] <= L0 - reduction * (L0 - Lmin)``.
    (A reduction relative to zero loss, ``losses[e] <= (1 - reduction) * L0``, is never reached
    by a model that cannot fit its training set, e.g. CIFAR-10 with early stopping.)

    Every loss must be measured the same way (e.g. eval-mode mean cross-entropy on a fixed
    set of training images, as :func:`ufm.core.train.train` records), or the threshold compares
    unlike numbers.

    The targets are the steps ``k * steps[e] / (n - 1)`` for ``k = 0..n-1``; each is matched to
    a kept checkpoint in ``0..e``, distinct and in order, minimising the total distance in
    steps (on a regular grid: the nearest one, halves to the earlier). The first is 0 and the
    last is ``e``. If fewer than ``n`` checkpoints exist up to ``e`` (``e + 1 <= n``), all of
    ``0..e`` are returned, i.e. fewer than ``n``. ``n = 1`` returns ``[e]``.

    Args:
        losses: training loss at every saved checkpoint, in save order; at least two values,
            finite.
        n: how many checkpoints to return, >= 1 (paper: 10).
        reduction: fraction of the achieved loss drop the checkpoints must span, in (0, 1]
            (paper: 0.95).
        steps: optimiser step of every checkpoint, strictly increasing, ``steps[0]`` the
            initial weights. Default ``0, 1, 2, ...`` (checkpoints taken at a fixed interval).

    Returns:
        Sorted, distinct checkpoint indices into ``losses``.
    """
    vals = [float(v) for v in losses]
    if len(vals) < 2:
        raise ValueError(f"losses needs the loss at >= 2 checkpoints (index 0 = initial "
                         f"weights), got {len(vals)}; save checkpoints during training")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("losses must all be finite; drop diverged checkpoints first")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (paper: 10), got {n!r}")
    if not 0.0 < reduction <= 1.0:
        raise ValueError(f"reduction must be in (0, 1] (paper: 0.95), got {reduction!r}")
    st = list(range(len(vals))) if steps is None else [int(v) for v in steps]
    if len(st) != len(vals):
        raise ValueError(f"steps has {len(st)} entries but losses has {len(vals)}; give one step per checkpoint")
    if any(b <= a for a, b in zip(st, st[1:])):
        raise ValueError(f"steps must be strictly increasing, got {st}")
    first, lowest = vals[0], min(vals)
    if lowest >= first:
        raise ValueError(f"the training loss never fell below its initial value {first:.4g}; "
                         "train longer or with a larger learning rate before running TracIn")
    threshold = first - reduction * (first - lowest)
    end = next(i for i, v in enumerate(vals) if v <= threshold)
    if n == 1:
        return [end]
    if end + 1 <= n:
        return list(range(end + 1))
    targets = [st[0] + k * (st[end] - st[0]) / (n - 1) for k in range(n)]
    return _match_in_order(st[:end + 1], targets)


def _match_in_order(cands: Sequence[int], targets: Sequence[float]) -> list[int]:
    """Strictly increasing indices ``j_0 < ... < j_{n-1}`` into ``cands`` (sorted steps), the first
    0 and the last ``len(cands) - 1``, minimising ``sum_k |cands[j_k] - targets[k]|`` (dynamic
    programming, O(n m)); ties go to the earlier index. Needs ``len(cands) >= len(targets) >= 2``."""
    m, n = len(cands), len(targets)
    inf = float("inf")
    # cost[k][j]: best total for targets 0..k with target k matched to candidate j
    cost = [[inf] * m for _ in range(n)]
    back = [[-1] * m for _ in range(n)]
    cost[0][0] = abs(cands[0] - targets[0])
    for k in range(1, n):
        best, arg = inf, -1
        for j in range(k, m - (n - 1 - k)):
            if cost[k - 1][j - 1] < best:
                best, arg = cost[k - 1][j - 1], j - 1
            if arg >= 0:
                cost[k][j] = best + abs(cands[j] - targets[k])
                back[k][j] = arg
    out = [m - 1]
    for k in range(n - 1, 0, -1):
        out.append(back[k][out[-1]])
    return out[::-1]


def rank_by_self_influence(scores: Tensor | Sequence[float]) -> tuple[Tensor, Tensor]:
    """Order examples by self-influence, highest first.

    Args:
        scores: ``(N,)`` self-influence scores (no NaN).

    Returns:
        ``(order, ranks)``, both ``(N,)`` int64: ``order[k]`` is the index of the example with
        the k-th highest score (ties keep index order); ``ranks[i]`` is the 0-based rank of
        example ``i`` (0 = most self-influential), so ``order[ranks[i]] == i``.
    """
    s = _check_scores(scores)
    order = torch.argsort(s, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(s.numel())
    return order, ranks


def top_bottom(scores: Tensor | Sequence[float], k_top: int = 15,
               k_bottom: int = 15) -> tuple[Tensor, Tensor]:
    """The ``k_top`` most and ``k_bottom`` least self-influential examples (paper: 15 each).

    Args:
        scores: ``(N,)`` self-influence scores.
        k_top, k_bottom: how many from each end, >= 0, with ``k_top + k_bottom <= N`` so that
            no example is picked twice.

    Returns:
        ``(top_idx, bottom_idx)``, int64: ``top_idx`` highest score first, ``bottom_idx``
        lowest score first.
    """
    s = _check_scores(scores)
    for name, k in (("k_top", k_top), ("k_bottom", k_bottom)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{name} must be an int >= 0, got {k!r}")
    if k_top + k_bottom > s.numel():
        raise ValueError(f"k_top + k_bottom = {k_top + k_bottom} exceeds the {s.numel()} scores, "
                         "so some examples would be both top and bottom; lower k_top/k_bottom")
    order, _ = rank_by_self_influence(s)
    bottom = order.flip(0)[:k_bottom] if k_bottom else order[:0]
    return order[:k_top], bottom


# --------------------------------------------------------------------------------------------
# Argument checks and set-up
# --------------------------------------------------------------------------------------------


def _check_checkpoints(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        raise ValueError("checkpoints must be a list of state dicts or paths, got a single "
                         f"{type(checkpoints).__name__}; wrap it in a list")
    ckpts = list(checkpoints)
    if not ckpts:
        raise ValueError("checkpoints is empty; pass at least one state dict or path "
                         "(paper: 10, see tracin_checkpoints)")
    for i, c in enumerate(ckpts):
        if not isinstance(c, (str, os.PathLike, Mapping)):
            raise ValueError(f"checkpoints[{i}] is a {type(c).__name__}; each checkpoint must "
                             "be a state dict (model.state_dict()) or a path to one")
    return ckpts


def _check_learning_rates(learning_rates: Sequence[float] | None, n: int) -> list[float]:
    if learning_rates is None:
        return [1.0] * n
    lrs = [float(v) for v in learning_rates]
    if len(lrs) != n:
        raise ValueError(f"learning_rates has {len(lrs)} values for {n} checkpoints; give one "
                         "learning rate per checkpoint, or None for 1.0 each")
    bad = [v for v in lrs if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"learning_rates must be finite and > 0, got {bad}")
    return lrs


def _check_data(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("x and y must be torch tensors; convert with torch.as_tensor")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one example in dimension 0, got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}; use y.long()")
    if int(y.min()) < 0:
        raise ValueError(f"labels y must be >= 0, got min {int(y.min())}")
    if y.device != x.device:
        raise ValueError(f"x is on {x.device} but y on {y.device}; move both to one device")


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if devices - {device}:
        raise ValueError(f"model is on {sorted(map(str, devices))} but x on {device}; call "
                         f"model.to(x.device) first")


def _selected_parameters(model: nn.Module, layers: Sequence[LayerSpec] | None) -> list[nn.Parameter]:
    if layers is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters; pass layers=[...] to choose "
                             "modules whose (frozen) parameters to score")
        return params
    if isinstance(layers, (str, nn.Module)):
        raise ValueError("layers must be a list of modules or module names; wrap it in a list")
    names = dict(model.named_modules())
    ids = {id(m) for m in names.values()}
    seen: set[int] = set()
    params = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in names:
                raise ValueError(f"layers: no submodule named {layer!r}; choose from "
                                 f"{[k for k in names if k]}")
            layer = names[layer]
        elif not isinstance(layer, nn.Module) or id(layer) not in ids:
            raise ValueError(f"layers: {layer!r} is not a submodule of model; pass modules "
                             "taken from model (e.g. model[-1]) or their names")
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("layers hold no parameters (e.g. ReLU, pooling); choose Linear, "
                         "Conv2d or normalisation layers")
    return params


def _load_checkpoint(model: nn.Module, ckpt: Checkpoint, device: torch.device, i: int) -> None:
    if isinstance(ckpt, Mapping):
        state = ckpt
    else:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoints[{i}] ({ckpt}) holds a {type(state).__name__}, not a "
                             "state dict; save checkpoints with torch.save(model.state_dict())")
    try:
        # load_state_dict copies into the existing parameters, so tensors on another device
        # end up on the model's (= x's) device.
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoints[{i}] does not fit the model: {err}") from err


def _check_scores(scores: Tensor | Sequence[float]) -> Tensor:
    s = torch.as_tensor(scores).detach().cpu()
    if s.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per example), got shape {tuple(s.shape)}")
    if s.is_floating_point() and bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN; recompute self-influence (diverged checkpoint?)")
    return s
