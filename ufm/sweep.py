"""Canary placement by self-influence (SPEC section 3, paper section 3.4.2).

1. :func:`influence_scores`: train a *reference* model without canaries, keep evenly spaced
   checkpoints, pick the paper's 10 spanning a 95% loss reduction, and score every training
   image by TracIn self-influence.
2. :func:`sweep_canaries`: put the feature on the top-k and bottom-k images, one new model per
   canary, and record M, p-values and exposure beside each canary's self-influence; Pearson r
   says whether influential images are memorised more. Results are written after every canary,
   so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .canary import CanaryChoice
from .experiment import ExperimentConfig, Result, prepare_data, run_experiment, training_split
from .fileio import atomic_write as write_atomic
from .influence import rank_by_self_influence, self_influence, top_bottom, tracin_checkpoints
from .models import build_model
from .plots import pearson
from .train import CancelFlag, Progress, ProgressFn, resolve_device, train

CHECKPOINTS_PER_EPOCH = 4  # sub-epoch checkpoints: MNIST loses most of its loss in epoch 1


@dataclass
class InfluenceScores:
    """Self-influence of every training image (indices into the first ``train_size`` images).

    Attributes:
        scores: (N,) float64, sum over checkpoints of lr x squared gradient norm.
        labels: (N,) int64 class labels.
        ranks: (N,) 0-based rank, 0 = most self-influential.
        checkpoint_steps: optimiser steps of the checkpoints used; ``learning_rates`` theirs.
        reference_key: config key of the reference (no-canary) model.
    """

    scores: np.ndarray
    labels: np.ndarray
    ranks: np.ndarray
    checkpoint_steps: list[int]
    learning_rates: list[float]
    reference_key: str
    seconds: float = 0.0

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"index": np.arange(len(self.scores)), "label": self.labels,
                             "self_influence": self.scores, "rank": self.ranks})

    def top_bottom(self, top: int = 15, bottom: int = 15) -> tuple[list[int], list[int]]:
        t, b = top_bottom(torch.tensor(self.scores), top, bottom)
        return t.tolist(), b.tolist()


def reference_config(config: ExperimentConfig) -> ExperimentConfig:
    """The no-canary model whose checkpoints TracIn uses (paper: 'a model trained without canaries')."""
    return config.replace(canary=CanaryChoice("none", ()))


def influence_scores(config: ExperimentConfig, *, n_checkpoints: int = 10, reduction: float = 0.95,
                     last_layer_only: bool = False, progress: ProgressFn | None = None,
                     cancel: CancelFlag = None) -> InfluenceScores:
    """Train the reference model of ``config`` and score every training image by self-influence.

    Checkpoints are kept :data:`CHECKPOINTS_PER_EPOCH` times an epoch (thinned evenly if
    training runs long); :func:`ufm.influence.tracin_checkpoints` picks ``n_checkpoints`` of
    them spanning ``reduction`` of the training-loss drop. Scored with the clean images (the
    reference model has no canary), cross-entropy on the true labels, all parameters unless
    ``last_layer_only``.
    """
    t0 = time.perf_counter()
    ref = reference_config(config)
    device = resolve_device(ref.device)
    data = prepare_data(ref, device)
    torch.manual_seed(ref.seed)
    c, h, w = data.train.image_shape
    model = build_model(ref.arch, c, (h, w), data.train.num_classes,
                        dropout=ref.dropout if "dropout" in ref.regularisers else 0.0,
                        batchnorm="batchnorm" in ref.regularisers).to(device)
    steps_per_epoch = math.ceil(len(data.train) / ref.effective_batch_size)
    tcfg = ref.train_config(hflip=ref.dataset == "cifar10")
    tcfg = replace(tcfg, checkpoint_every=max(1, steps_per_epoch // CHECKPOINTS_PER_EPOCH))
    trained = train(model, data.train, data.val, tcfg, progress=progress, cancel=cancel)
    chosen = tracin_checkpoints([ck.train_loss for ck in trained.checkpoints], n=n_checkpoints, reduction=reduction)
    ckpts = [trained.checkpoints[i] for i in chosen]
    if progress is not None:
        progress(Progress("influence", trained.epochs_trained, tcfg.max_epochs,
                          message=f"self-influence of {len(data.train) + len(data.val)} images, {len(ckpts)} checkpoints"))
    # Every training image gets a score, the validation part too: canaries are chosen by
    # index into the whole (first train_size) training set, which has no canary here.
    full = training_split(ref).to(device)
    full_x, full_y = full.x, full.y
    layers = None
    if last_layer_only:
        linears = [m for m in trained.model.modules() if isinstance(m, torch.nn.Linear)]
        layers = linears[-1:]
    scores = self_influence(trained.model, [ck.state_dict for ck in ckpts], full_x, full_y,
                            learning_rates=[ck.lr for ck in ckpts], layers=layers)
    _, ranks = rank_by_self_influence(scores)
    return InfluenceScores(scores.numpy(), full_y.cpu().numpy(), ranks.numpy(), [ck.step for ck in ckpts],
                           [ck.lr for ck in ckpts], ref.key(), time.perf_counter() - t0)


SWEEP_COLUMNS = ["index", "label", "group", "self_influence", "influence_rank", "M", "X_u", "X_r", "p_value",
                 "p_value_paired", "exposure", "exposure_p_value", "significant", "test_accuracy",
                 "epochs_trained", "config_key"]


@dataclass
class SweepResult:
    table: pd.DataFrame
    pearson_r: float
    pearson_p: float

    def summary(self) -> str:
        n = len(self.table)
        sig = int(self.table["significant"].sum()) if n else 0
        return (f"{n} canaries, {sig} memorised (exposure p < alpha); Pearson r(self-influence, M) = "
                f"{self.pearson_r:.3f} (p = {self.pearson_p:.3g})")


def sweep_canaries(config: ExperimentConfig, out_dir: str | Path, *, top: int = 15, bottom: int = 15,
                   n_checkpoints: int = 10, progress: ProgressFn | None = None, cancel: CancelFlag = None,
                   run: Callable[[ExperimentConfig], Result] | None = None) -> SweepResult:
    """Train one model per top-/bottom-k self-influence canary and relate M to self-influence.

    Writes ``out_dir/influence.csv`` (all images), ``out_dir/sweep.csv`` (one row per finished
    canary) and ``out_dir/sweep.json`` (rows + Pearson r + the base config). Re-running with the
    same ``out_dir`` and config reuses the influence scores and skips finished canaries.

    Args:
        run: how to train one canary model (default :func:`run_experiment`; the run store passes
            its cached runner).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path, infl_path, csv_path = out / "sweep.json", out / "influence.csv", out / "sweep.csv"
    base_key = reference_config(config).key()
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("reference_key") != base_key:
            raise ValueError(f"{out} holds a sweep of a different configuration; choose another --out folder")
    run = run or (lambda c: run_experiment(c, progress=progress, cancel=cancel))

    if infl_path.exists():
        table = pd.read_csv(infl_path)
        scores = table["self_influence"].to_numpy()
    else:
        infl = influence_scores(config, n_checkpoints=n_checkpoints, progress=progress, cancel=cancel)
        table = infl.table()
        write_atomic(infl_path, table.to_csv(index=False))
        scores = infl.scores
    t_idx, b_idx = top_bottom(torch.tensor(scores), top, bottom)
    chosen = [(int(i), "top") for i in t_idx] + [(int(i), "bottom") for i in b_idx]

    rows = pd.read_csv(csv_path).to_dict("records") if csv_path.exists() else []
    done = {(int(r["index"]), r["config_key"]) for r in rows}
    for k, (idx, group) in enumerate(chosen):
        cfg = config.replace(canary=CanaryChoice("index", (idx,)))
        if (idx, cfg.key()) in done:
            continue
        if progress is not None:
            progress(Progress("sweep", k, len(chosen), message=f"canary {k + 1}/{len(chosen)}: image {idx} ({group})"))
        res = run(cfg)
        s = res.score
        rows.append(dict(index=idx, label=int(table["label"][idx]), group=group, self_influence=float(scores[idx]),
                         influence_rank=int(table["rank"][idx]), M=s.M, X_u=s.X_u, X_r=s.X_r, p_value=s.p_value,
                         p_value_paired=s.p_value_paired, exposure=s.exposure, exposure_p_value=s.exposure_p_value,
                         significant=bool(s.significant), test_accuracy=res.test_accuracy,
                         epochs_trained=res.epochs_trained, config_key=cfg.key()))
        _write_sweep(rows, config, base_key, csv_path, meta_path)
    _write_sweep(rows, config, base_key, csv_path, meta_path)
    df = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    r, p = pearson(df["self_influence"], df["M"])
    return SweepResult(df, r, p)


def _write_sweep(rows: list[dict[str, Any]], config: ExperimentConfig, base_key: str, csv_path: Path,
                 meta_path: Path) -> None:
    df = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    write_atomic(csv_path, df.to_csv(index=False))
    r, p = pearson(df["self_influence"], df["M"]) if len(df) else (float("nan"), float("nan"))
    meta = {"reference_key": base_key, "config": config.to_dict(), "pearson_r": None if math.isnan(r) else r,
            "pearson_p": None if math.isnan(p) else p, "rows": df.to_dict("records")}
    write_atomic(meta_path, json.dumps(meta, indent=1))
