"""Per-example squared gradient norms of one batch, in one forward and one backward pass.

Used by :func:`ufm.attribution.tracin.self_influence`. Forward hooks record each layer's input
``a`` and the gradient ``b`` of the summed loss with respect to the layer's output (the
"backprop"); the per-example squared norm then follows in closed form (the "ghost norm" trick of
Goodfellow 2015 and Li et al. 2022, https://arxiv.org/abs/2110.05679), see the module docstring
of :mod:`ufm.attribution.tracin` for the three cases (Linear, Conv2d, any other layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["group_by_module", "squared_grad_norms", "outer_sq_norm"]

# --------------------------------------------------------------------------------------------
# Per-example squared gradient norms for one batch
# --------------------------------------------------------------------------------------------


def squared_grad_norms(model: nn.Module, groups: list[tuple[nn.Module, str, list[str]]],
                       xb: Tensor, yb: Tensor) -> Tensor:
    """``||grad_w CE(model(xb_n), yb_n)||^2`` over the grouped parameters, ``(B,)``."""
    records: dict[int, list[tuple[tuple[Any, ...], list[int], Tensor]]] = {
        id(m): [] for m, _, _ in groups}

    def make_hook(module: nn.Module):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any):
            if not isinstance(out, Tensor):
                raise ValueError(f"{type(mod).__name__} returns {type(out).__name__}, not a "
                                 "tensor; leave it out with layers=[...]")
            if kwargs:
                raise ValueError(f"{type(mod).__name__} was called with keyword arguments "
                                 f"{sorted(kwargs)}; leave it out with layers=[...]")
            acts = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            versions = [a._version if isinstance(a, Tensor) else -1 for a in args]
            records[id(module)].append((acts, versions, out))
            # Hand later layers a copy: an in-place op downstream (ReLU(inplace=True) after a
            # BatchNorm, as in torchvision's DenseNet) would otherwise rewrite `out` and the
            # gradient taken w.r.t. it would be that of the wrong tensor.
            return out.clone()
        return hook

    handles = [m.register_forward_hook(make_hook(m), with_kwargs=True) for m, _, _ in groups]
    try:
        with torch.enable_grad():
            logits = model(xb)
            if logits.dim() != 2 or logits.shape[0] != xb.shape[0]:
                raise ValueError(f"model must return logits of shape (N, K), got "
                                 f"{tuple(logits.shape)} for N = {xb.shape[0]}")
            if int(yb.max()) >= logits.shape[1]:
                raise ValueError(f"labels y must be < the {logits.shape[1]} classes the model "
                                 f"predicts, got max {int(yb.max())}")
            # Sum, not mean: then d loss / d out_n is example n's own backprop, unscaled.
            loss = F.cross_entropy(logits, yb, reduction="sum")
            outs = [out for m, _, _ in groups for (_, _, out) in records[id(m)]]
            live = [o.requires_grad and loss.requires_grad for o in outs]
            wrt = [o for o, ok in zip(outs, live) if ok]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ()
    finally:
        for h in handles:
            h.remove()

    it = iter(grads)
    backprops = [next(it) if ok else None for ok in live]
    total = torch.zeros(xb.shape[0], dtype=logits.dtype, device=xb.device)
    k = 0
    for module, name, pnames in groups:
        calls = records[id(module)]
        if not calls:
            raise ValueError(f"module {name!r} ({type(module).__name__}) holds selected "
                             "parameters but was never called in forward; exclude it with "
                             "layers=[...]")
        bps = backprops[k:k + len(calls)]
        k += len(calls)
        for acts, versions, _ in calls:
            if any(isinstance(a, Tensor) and a._version != v for a, v in zip(acts, versions)):
                raise RuntimeError(f"the input of {name!r} was modified in place after the "
                                   "layer ran, so its recorded activations are stale; make "
                                   "the in-place op out-of-place")
        pairs = [(acts, bp) for (acts, _, _), bp in zip(calls, bps) if bp is not None]
        if not pairs:
            continue  # outputs do not reach the loss: the gradient is exactly zero
        n = xb.shape[0]
        for acts, bp in pairs:
            if bp.shape[0] != n or not isinstance(acts[0], Tensor) or acts[0].shape[0] != n:
                raise ValueError(f"module {name!r} does not keep the batch in dimension 0 "
                                 "(per-example gradients need it); exclude it with layers=[...]")
        total += module_sq_norm(module, pnames, pairs)
    return total


def module_sq_norm(module: nn.Module, pnames: list[str],
                   pairs: list[tuple[tuple[Any, ...], Tensor]]) -> Tensor:
    """Per-example squared gradient norm of ``module``'s parameters ``pnames``, ``(N,)``.

    ``pairs`` holds (inputs, backprop) for every call of the module in the forward pass; the
    per-example gradients of all calls add up before the norm is taken.
    """
    if type(module).forward is nn.Linear.forward:
        return _linear_sq_norm(module, pnames, pairs)
    if type(module).forward is nn.Conv2d.forward:
        return _conv2d_sq_norm(module, pnames, pairs)
    return _generic_sq_norm(module, pnames, pairs)


def outer_sq_norm(a: Tensor, b: Tensor, method: str | None = None) -> Tensor:
    """``||b_n^T a_n||_F^2`` for ``a`` ``(N, T, D)`` and ``b`` ``(N, T, O)``, ``(N,)``.

    ``b_n^T a_n = sum_t b_nt a_nt^T`` is the per-example weight gradient of a layer applied at T
    positions. ``method``: ``"gram"`` (``sum_{ts} (a a^T)_{ts} (b b^T)_{ts}``, cost T^2 (D + O)),
    ``"materialise"`` (form the (O, D) gradient, cost T D O) or None = the cheaper one.
    """
    _, t, d = a.shape
    o = b.shape[2]
    if method is None:
        if t == 1:  # outer product of two vectors: norms multiply
            return a.square().sum((1, 2)) * b.square().sum((1, 2))
        method = "gram" if t * (d + o) < d * o else "materialise"
    if method == "gram":
        return (torch.bmm(a, a.mT) * torch.bmm(b, b.mT)).sum((1, 2))
    if method == "materialise":
        return torch.bmm(b.mT, a).square().sum((1, 2))
    raise ValueError(f"method must be 'gram', 'materialise' or None, got {method!r}")


def _cat_positions(parts: list[Tensor]) -> Tensor:
    # One call is the common case; torch.cat would copy (slowly, for transposed views).
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _linear_sq_norm(module: nn.Linear, pnames: list[str],
                   pairs: list[tuple[tuple[Any, ...], Tensor]]) -> Tensor:
    # Extra input dims (N, ..., D) are positions t sharing the weight; so are repeated calls.
    n = pairs[0][1].shape[0]
    b = _cat_positions([bp.reshape(n, -1, module.out_features) for _, bp in pairs])
    sq = torch.zeros(n, dtype=b.dtype, device=b.device)
    if "weight" in pnames:
        a = _cat_positions([acts[0].reshape(n, -1, module.in_features) for acts, _ in pairs])
        sq = sq + outer_sq_norm(a, b)
    if "bias" in pnames:
        sq = sq + b.sum(1).square().sum(1)
    return sq


def _conv2d_sq_norm(module: nn.Conv2d, pnames: list[str],
                   pairs: list[tuple[tuple[Any, ...], Tensor]]) -> Tensor:
    n = pairs[0][1].shape[0]
    g = module.groups
    o, d_g = module.out_channels, module.weight[0].numel()  # D_g = C/g * kh * kw
    sq = torch.zeros(n, dtype=pairs[0][1].dtype, device=pairs[0][1].device)
    if "bias" in pnames:
        sq = sq + sum(bp.flatten(2).sum(2) for _, bp in pairs).square().sum(1)
    if "weight" not in pnames:
        return sq
    inputs = []
    for acts, _ in pairs:
        inp = acts[0]
        if inp.dim() != 4:
            raise ValueError(f"Conv2d got a {inp.dim()}-D input; per-example gradients need "
                             "batched (N, C, H, W) inputs")
        # Pad exactly as Conv2d.forward does (any padding_mode, padding="same"); from here on
        # the convolution is unpadded.
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            inp = F.pad(inp, pad, mode=mode)
        inputs.append(inp)
    t = sum(bp[0, 0].numel() for _, bp in pairs)  # output positions, over all calls
    if t * (d_g + o // g) < d_g * (o // g):
        # Gram form on unfolded patches (N, C*kh*kw, T); groups j of one example are treated
        # as separate rows (n, j) and added up afterwards, since group j's weight gradient
        # only sees its own C/g input and O/g output channels.
        a = _cat_positions([
            F.unfold(inp, module.kernel_size, dilation=module.dilation, stride=module.stride)
            .reshape(n * g, d_g, -1).mT for inp in inputs])                   # (N*g, T, D_g)
        b = _cat_positions([bp.reshape(n * g, o // g, -1).mT for _, bp in pairs])  # (N*g, T, O_g)
        return sq + outer_sq_norm(a, b, "gram").view(n, g).sum(1)
    # Materialise every example's (O, C/g, kh, kw) gradient with one grouped weight-gradient
    # convolution: folding the batch into the channels (groups = N * g) makes example n's
    # channels a group of their own. Faster on CPU than unfold + bmm (no im2col copy).
    per_example = None
    for inp, (_, bp) in zip(inputs, pairs):
        gw = torch.nn.grad.conv2d_weight(
            inp.reshape(1, -1, *inp.shape[2:]), (n * o, *module.weight.shape[1:]),
            bp.reshape(1, -1, *bp.shape[2:]), stride=module.stride, padding=0,
            dilation=module.dilation, groups=n * g)                          # (N*O, C/g, kh, kw)
        per_example = gw if per_example is None else per_example + gw
    return sq + per_example.view(n, -1).square().sum(1)


def _generic_sq_norm(module: nn.Module, pnames: list[str],
                     pairs: list[tuple[tuple[Any, ...], Tensor]]) -> Tensor:
    """Exact per-example gradients of any layer via ``vmap(grad(...))`` of that layer alone.

    For example n, ``d/dp <module(p; a_n), b_n>`` is its parameter gradient, because ``b_n`` is
    d loss / d output_n. Needs a layer that treats examples independently (BatchNorm only in
    eval mode, which :func:`self_influence` guarantees).
    """
    own = dict(module.named_parameters(recurse=False))
    params = {k: own[k].detach() for k in pnames}

    def inner(p: dict[str, Tensor], args: tuple[Tensor, ...], b: Tensor) -> Tensor:
        out = functional_call(module, p, tuple(a.unsqueeze(0) for a in args))
        return (out * b.unsqueeze(0)).sum()

    per_example = vmap(grad(inner), in_dims=(None, 0, 0))
    total: dict[str, Tensor] = {}
    for acts, bp in pairs:
        if not all(isinstance(a, Tensor) for a in acts):
            raise ValueError(f"{type(module).__name__} takes non-tensor arguments; exclude it "
                             "with layers=[...]")
        for k, v in per_example(params, acts, bp).items():
            total[k] = total[k] + v if k in total else v
    return sum(v.flatten(1).square().sum(1) for v in total.values())



def group_by_module(model: nn.Module,
                    params: list[nn.Parameter]) -> list[tuple[nn.Module, str, list[str]]]:
    """``(module, module name, [names of its own selected parameters])`` in module order."""
    wanted = {id(p) for p in params}
    owner: dict[int, str] = {}
    groups = []
    for mname, module in model.named_modules():
        pnames = []
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in wanted:
                continue
            if id(p) in owner:
                raise ValueError(f"parameter {mname}.{pname} is shared with {owner[id(p)]}; "
                                 "tied weights are not supported, drop one with layers=[...]")
            owner[id(p)] = f"{mname}.{pname}"
            pnames.append(pname)
        if pnames:
            groups.append((module, mname, pnames))
    return groups
