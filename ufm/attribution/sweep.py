"""Canary placement by self-influence (SPEC section 3, paper section 3.4.2).

1. :func:`influence_scores`: train the *ranking model* (the setting without canaries, a run of
   the store that keeps evenly spaced checkpoints), pick the paper's 10 checkpoints spanning a
   95% loss reduction, and score every image the ranking model trained on by TracIn
   self-influence (validation images are not ranked: the ranking model never took a gradient
   step on them). :func:`cached_influence` keeps that table under the store's home, keyed by the
   ranking config, for the CLI and the dashboard alike.
2. :func:`sweep_canaries`: put the feature on the top-k and bottom-k images, one new model per
   canary, as a study in the run store (:func:`ensure_sweep_study`), and record M, p-values
   and exposure beside each canary's self-influence; Pearson r says whether influential images
   are memorised more. Finished runs are reused through the store, so an interrupted sweep
   resumes by training only the missing canaries.

Because canaries come only from the ranking model's training part, and a canary only ever
displaces itself from the validation set (:func:`ufm.core.data.train_val_split`), every canary model
of a sweep has the ranking model's validation set, and its training set differs from another
canary model's only in the stamped image. ("Reference models" are only the clean bank of
:mod:`ufm.measure.bank`.)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ufm.core.canary import CanaryChoice
from ufm.core.sampling import train_val_split
from ufm.core.experiment import ExperimentConfig, prepare_data, training_split
from ufm.fileio import atomic_write as write_atomic, private_dir
from ufm.attribution.tracin import rank_by_self_influence, self_influence, top_bottom, tracin_checkpoints
from ufm.measure.stats import pearson
from ufm.reports.run_report import export_names, to_csv
from ufm.core.train import CancelFlag, Progress, ProgressFn, TrainingCancelled, is_cancelled, resolve_device

CHECKPOINTS_PER_EPOCH = 4  # sub-epoch checkpoints: MNIST loses most of its loss in epoch 1
DEFAULT_CHECKPOINTS = 10   # the paper's number of TracIn checkpoints


@dataclass
class InfluenceScores:
    """Self-influence of every image the ranking model trained on.

    Attributes:
        indices: (N,) int64, the scored images as indices into the first ``train_size``
            training images (the ranking model's training part; its validation part is left out).
        scores: (N,) float64, sum over checkpoints of lr x squared gradient norm.
        labels: (N,) int64 class labels.
        ranks: (N,) 0-based rank, 0 = most self-influential.
        checkpoint_steps: optimiser steps of the checkpoints used; ``learning_rates`` theirs.
        ranking_key: config key of :func:`ranking_config` (the ranking model's setting).
        run_id: the ranking model's run in the store.
    """

    scores: np.ndarray
    labels: np.ndarray
    ranks: np.ndarray
    checkpoint_steps: list[int]
    learning_rates: list[float]
    ranking_key: str
    seconds: float = 0.0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    run_id: str = ""

    def table(self) -> pd.DataFrame:
        """Columns ``index`` (into the training set), ``label``, ``self_influence``, ``rank``."""
        return pd.DataFrame({"index": self.indices, "label": self.labels, "self_influence": self.scores,
                             "rank": self.ranks})

    def top_bottom(self, top: int = 15, bottom: int = 15) -> tuple[list[int], list[int]]:
        """Training-set indices of the ``top`` most (highest first) and ``bottom`` least
        (lowest first) self-influential images."""
        t, b = top_bottom(torch.tensor(self.scores), top, bottom)
        return self.indices[t.numpy()].tolist(), self.indices[b.numpy()].tolist()


def ranking_config(config: ExperimentConfig) -> ExperimentConfig:
    """The ranking model's setting: ``config`` without canaries (paper: 'a model trained without
    canaries'); its key names the ranking's table and sweep. Trained as :func:`ranking_run_config`."""
    return config.replace(canary=CanaryChoice("none", ()))


def ranking_train_indices(config: ExperimentConfig) -> np.ndarray:
    """Sorted training-set indices the ranking model of ``config`` trains on (its split has
    no canary to displace)."""
    ref = ranking_config(config)
    return train_val_split(len(training_split(ref)), ref.val_fraction, seed=ref.seed)[0]


def ranking_run_config(config: ExperimentConfig) -> ExperimentConfig:
    """The run that trains the ranking model: :func:`ranking_config` keeping a TracIn checkpoint
    :data:`CHECKPOINTS_PER_EPOCH` times an epoch (each with the same eval-mode training loss,
    :func:`ufm.core.train.train`)."""
    ref = ranking_config(config)
    steps_per_epoch = math.ceil(len(ranking_train_indices(config)) / ref.effective_batch_size)
    return ref.replace(checkpoint_every=max(1, steps_per_epoch // CHECKPOINTS_PER_EPOCH))


def influence_scores(config: ExperimentConfig, *, n_checkpoints: int = DEFAULT_CHECKPOINTS, reduction: float = 0.95,
                     last_layer_only: bool = False, progress: ProgressFn | None = None,
                     cancel: CancelFlag = None, store: Any = None, executor: Any = None) -> InfluenceScores:
    """Train the ranking model of ``config`` and score every image it trained on by self-influence.

    The ranking model is a run of the store (:func:`ranking_run_config`, through ``executor``;
    default: :class:`ufm.runs.engine.InlineExecutor` on ``store``, itself default the store of
    ``$UFM_HOME``), so it is listed, cancellable and reused when identical.
    :func:`ufm.attribution.tracin.tracin_checkpoints` picks ``n_checkpoints`` of its checkpoints
    evenly spaced in steps over ``reduction`` of the training-loss drop. Scored with the clean
    images (the ranking model has no canary), cross-entropy on the true labels, all parameters
    unless ``last_layer_only``. Validation images get no score: they cannot be canaries of a sweep
    whose models share the ranking model's split.

    Raises:
        TrainingCancelled: the ranking run was cancelled; RuntimeError: it failed (its error).
    """
    from ufm.runs.engine import InlineExecutor, wait_for
    from ufm.runs.store import Store

    t0 = time.perf_counter()
    run_cfg = ranking_run_config(config)
    if executor is None:
        executor = InlineExecutor(store if store is not None else Store.open(), progress=progress, cancel=cancel,
                                  check_sizes=False)  # as before: a train_size beyond the data uses all of it
    store = executor.store
    run_id = executor.submit(run_cfg)
    rec = wait_for(executor, [run_id], cancel=cancel)[0]
    if rec.status == "cancelled":
        raise TrainingCancelled(f"the ranking model's run {run_id} was cancelled")
    if rec.status != "done":
        raise RuntimeError(f"the ranking model's run {run_id} {rec.status}: {rec.error}")
    saved = store.load_checkpoints(run_id)
    chosen = tracin_checkpoints([ck.train_loss for ck in saved], n=n_checkpoints, reduction=reduction,
                                steps=[ck.step for ck in saved])
    ckpts = [saved[i] for i in chosen]
    device = resolve_device(run_cfg.device)
    data = prepare_data(run_cfg, device)
    model = store.load_model(run_id, device=str(device))
    if progress is not None:
        progress(Progress("influence", rec.summary.get("epochs_trained", 0) if rec.summary else 0, run_cfg.epochs,
                          message=f"self-influence of {len(data.train)} training images, {len(ckpts)} checkpoints"))
    layers = None
    if last_layer_only:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        layers = linears[-1:]
    scores = self_influence(model, [ck.state_dict for ck in ckpts], data.train.x, data.train.y,
                            learning_rates=[ck.lr for ck in ckpts], layers=layers)
    _, ranks = rank_by_self_influence(scores)
    return InfluenceScores(scores.numpy(), data.train.y.cpu().numpy(), ranks.numpy(), [ck.step for ck in ckpts],
                           [ck.lr for ck in ckpts], ranking_config(config).key(), time.perf_counter() - t0,
                           indices=np.asarray(data.train_indices, dtype=np.int64), run_id=run_id)



# ---------------------------------------------------------------------------------- the cached table

def influence_path(home: str | Path, ranking_key: str, n_checkpoints: int = DEFAULT_CHECKPOINTS) -> Path:
    """Where the self-influence table of a ranking model is cached under a ufm home
    (``<home>/influence/<ranking key>.csv``; a non-default checkpoint count adds ``-ck<n>``)."""
    suffix = "" if n_checkpoints == DEFAULT_CHECKPOINTS else f"-ck{n_checkpoints}"
    return Path(home) / "influence" / f"{ranking_key}{suffix}.csv"


def load_influence_table(path: str | Path, config: ExperimentConfig) -> pd.DataFrame | None:
    """The cached table at ``path`` if it ranks exactly the images the ranking model of
    ``config`` trains on; None if there is none or it is stale (e.g. written by a ufm that also
    ranked validation images)."""
    path = Path(path)
    if not path.exists():
        return None
    table = pd.read_csv(path)
    if not {"index", "label", "self_influence", "rank"} <= set(table.columns):
        return None
    if not np.array_equal(np.sort(table["index"].to_numpy()), ranking_train_indices(config)):
        return None
    return table


def cached_influence(home: str | Path, config: ExperimentConfig, *, n_checkpoints: int = DEFAULT_CHECKPOINTS,
                     progress: ProgressFn | None = None, cancel: CancelFlag = None,
                     executor: Any = None) -> pd.DataFrame:
    """The self-influence table of ``config``'s ranking model (:meth:`InfluenceScores.table`),
    read from :func:`influence_path` under ``home`` or computed (:func:`influence_scores`, the
    ranking model a run of the store at ``home``, on ``executor`` if given) and written there."""
    from ufm.runs.store import Store

    path = influence_path(home, ranking_config(config).key(), n_checkpoints)
    table = load_influence_table(path, config)
    if table is None:
        if executor is not None and Path(executor.store.home) != Path(home):
            raise ValueError(f"the executor records runs in {executor.store.home}, the table goes to {home}; "
                             "give both the same home")
        if executor is None:
            with Store.open(home) as store:
                table = influence_scores(config, n_checkpoints=n_checkpoints, progress=progress, cancel=cancel,
                                         store=store).table()
        else:
            table = influence_scores(config, n_checkpoints=n_checkpoints, progress=progress, cancel=cancel,
                                     executor=executor).table()
        write_atomic(path, table.to_csv(index=False), private=True)  # under the (private) ufm home
    return table


# ---------------------------------------------------------------------------------- the sweep study

def sweep_members(config: ExperimentConfig, table: pd.DataFrame, top: int, bottom: int) -> list[Any]:
    """One :class:`ufm.runs.studies.StudyMember` per canary: the ``top`` most self-influential images
    of ``table`` (highest first, group ``"top"``), then the ``bottom`` least (lowest first)."""
    from ufm.runs.studies import StudyMember

    for name, k in (("top", top), ("bottom", bottom)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{name} must be an int >= 0, got {k!r}")
    if top + bottom < 1 or top + bottom > len(table):
        raise ValueError(f"top + bottom = {top + bottom} canaries must be between 1 and the {len(table)} ranked "
                         "images; lower --top/--bottom or use more training images")
    order = table.sort_values("rank")["index"].astype(int).tolist()
    chosen = [(i, "top") for i in order[:top]] + [(i, "bottom") for i in order[::-1][:bottom]]
    return [StudyMember(group, config.replace(canary=CanaryChoice("index", (i,)))) for i, group in chosen]


def sweep_study_name(config: ExperimentConfig, top: int, bottom: int) -> str:
    """The study name of a sweep: the ranking config key (which fixes data, model, feature,
    seed and budget) and the number of canaries from each end."""
    return (f"sweep {ranking_config(config).key()} top{top} bottom{bottom} "
            f"feature {config.feature.name} seed {config.seed}")


def ensure_sweep_study(store: Any, config: ExperimentConfig, table: pd.DataFrame, top: int, bottom: int) -> str:
    """Create the sweep study of ``config`` in ``store`` (or keep the one that exists with the
    same members: :func:`ufm.runs.studies.ensure_study`); returns its name. Runs are not started here."""
    from ufm.runs.studies import ensure_study

    return ensure_study(store, sweep_study_name(config, top, bottom), "canaries", config,
                        sweep_members(config, table, top, bottom),
                        description=f"top-{top} and bottom-{bottom} self-influence canaries")


SWEEP_COLUMNS = ["index", "label", "group", "self_influence", "influence_rank", "M", "X_u", "X_r", "p_value",
                 "p_value_paired", "exposure", "exposure_p_value", "verdict", "verdict_test", "verdict_p",
                 "significant", "test_accuracy", "epochs_trained", "config_key", "run_id", "status"]


def sweep_rows(store: Any, name: str, table: pd.DataFrame) -> pd.DataFrame:
    """One row per canary of sweep study ``name`` (:data:`SWEEP_COLUMNS`), in member order;
    the numbers are NaN until its run is done. ``significant`` is the verdict
    (:func:`ufm.runs.studies.runs_frame`: the reference test where its bank exists)."""
    from ufm.runs.studies import get_study, runs_frame

    infl = table.set_index("index")
    runs = runs_frame(store, name)
    entries = get_study(store, name).entries
    idx = [int(e.config.canary.indices[0]) for e in entries]
    epochs = []
    for run_id, status in zip(runs["run_id"], runs["status"]):
        s = store.get(run_id).summary if status == "done" else None
        epochs.append((s or {}).get("epochs_trained", np.nan))
    df = runs.assign(index=idx, label=[int(infl.loc[i, "label"]) for i in idx],
                     self_influence=[float(infl.loc[i, "self_influence"]) for i in idx],
                     influence_rank=[int(infl.loc[i, "rank"]) for i in idx], epochs_trained=epochs,
                     config_key=[e.config.key() for e in entries])
    return df[SWEEP_COLUMNS].reset_index(drop=True)


@dataclass
class SweepResult:
    """``table``: the finished canaries (:data:`SWEEP_COLUMNS`); Pearson r of self-influence and M."""

    table: pd.DataFrame
    pearson_r: float
    pearson_p: float
    study: str = ""
    pending: int = 0

    def summary(self) -> str:
        n = len(self.table)
        sig = int(self.table["significant"].astype(bool).sum()) if n else 0
        more = f" ({self.pending} not finished)" if self.pending else ""
        return (f"{n} canaries{more}, {sig} memorised (verdict); Pearson r(self-influence, M) = "
                f"{self.pearson_r:.3f} (p = {self.pearson_p:.3g})")


def sweep_canaries(config: ExperimentConfig, out_dir: str | Path, *, store: Any = None, top: int = 15,
                   bottom: int = 15, n_checkpoints: int = DEFAULT_CHECKPOINTS, progress: ProgressFn | None = None,
                   cancel: CancelFlag = None, executor: Any = None) -> SweepResult:
    """Train one model per top-/bottom-k self-influence canary and relate M to self-influence.

    The sweep is the study :func:`ensure_sweep_study` in ``store`` (default: the store of
    ``$UFM_HOME``), the same one the dashboard's Influence page runs; the self-influence table
    is :func:`cached_influence` under the store's home. The ranking model and the canaries are
    runs on ``executor`` (a :class:`ufm.runs.engine.Executor` on the same store, e.g. Ray;
    default :class:`ufm.runs.engine.InlineExecutor`: one after the other in this thread); the
    table is rewritten as each canary finishes. A canary whose identical run already finished in
    the store is not trained again, so a killed sweep resumes with the missing canaries only.

    Writes ``out_dir/influence.csv`` (the ranked images), ``out_dir/sweep.csv`` (one row per
    finished canary, rewritten after each) and ``out_dir/sweep.json`` (rows + Pearson r + the
    base config + the study name).

    Raises:
        ValueError: ``out_dir`` holds a sweep of another ranking configuration, or bad top/bottom.
    """
    from ufm.runs.engine import InlineExecutor, wait_for
    from ufm.runs.store import Store
    from ufm.runs.studies import submit_study

    out = Path(out_dir)
    private_dir(out)  # its files name the feature (sweep.json's config): 0700/0600 like every export
    meta_path, csv_path = out / "sweep.json", out / "sweep.csv"
    base_key = ranking_config(config).key()
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("reference_key") != base_key:  # the file's key name predates "ranking model"
            raise ValueError(f"{out} holds a sweep of a different configuration; choose another --out folder")
    if executor is not None and store is not None and executor.store.home != store.home:
        raise ValueError(f"the executor records runs in {executor.store.home}, the sweep in {store.home}; "
                         "give both the same store")
    store = executor.store if executor is not None else (store if store is not None else Store.open())
    executor = executor if executor is not None else InlineExecutor(store, progress=progress, cancel=cancel)
    table = cached_influence(store.home, config, n_checkpoints=n_checkpoints, progress=progress, cancel=cancel,
                             executor=executor)
    write_atomic(out / "influence.csv", to_csv(table), private=True)
    name = ensure_sweep_study(store, config, table, top, bottom)

    def write(*_: Any) -> SweepResult:
        return _write_sweep(store, name, table, config, base_key, csv_path, meta_path)

    def announce(k: int, n: int, e: Any) -> None:
        if is_cancelled(cancel):
            raise TrainingCancelled("the sweep was cancelled")
        if progress is not None and store.find_cached(e.config) is None:
            progress(Progress("sweep", k, n, message=f"canary {k + 1}/{n}: image {e.config.canary.indices[0]} "
                                                      f"({e.group})"))

    write()
    ids = submit_study(executor, name, before=announce, after=write)
    wait_for(executor, ids, cancel=cancel, on_finished=write)
    return write()


def _write_sweep(store: Any, name: str, table: pd.DataFrame, config: ExperimentConfig, base_key: str,
                 csv_path: Path, meta_path: Path) -> SweepResult:
    rows = sweep_rows(store, name, table)
    done = rows[rows["status"] == "done"].reset_index(drop=True)
    write_atomic(csv_path, to_csv(done), private=True)
    r, p = pearson(done["self_influence"], done["M"]) if len(done) else (float("nan"), float("nan"))
    meta = {"reference_key": base_key, "study": name, "config": config.to_dict(),
            "pearson_r": None if math.isnan(r) else r, "pearson_p": None if math.isnan(p) else p,
            "pending": int(len(rows) - len(done)), "rows": json.loads(export_names(done).to_json(orient="records"))}
    write_atomic(meta_path, json.dumps(meta, indent=1), private=True)
    return SweepResult(done, r, p, name, int(len(rows) - len(done)))
