"""The Influence page's pieces: computing the ranking in the background, the gallery, the sweep.

The ranking and the sweep are those of ``ufm sweep-canaries`` (:mod:`ufm.attribution.sweep`): the table is
cached under the store's home by the ranking config key, the sweep is a study in the store.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from ufm.core.experiment import ExperimentConfig
from ufm.fileio import private_dir
from ufm.runs.studies import submit_study
from ufm.attribution.sweep import (cached_influence, ensure_sweep_study, influence_path, load_influence_table,
                                   ranking_config, ranking_run_config, sweep_rows)

from . import background, state


MIN_POINTS = 10  # a correlation from fewer points is shown with a warning


def cancel_path(key: str) -> Path:
    """The file whose existence tells the ranking task of ``key`` to stop (it runs in another process)."""
    return Path(state.store().home) / "influence" / f"{key}.cancel"


def compute_ranking(report, config: ExperimentConfig, home: str, stop_file: str | None = None,
                    run_id: str | None = None) -> None:
    """The background task (its own process, see ``background.Tasks``): the cached self-influence table.
    ``run_id``: the ranking model's run, submitted to the dashboard's executor (listed on the Runs
    page, counted by the pending cap); the task waits for it, then scores. It stops
    (TrainingCancelled, the run cancelled too) once ``stop_file`` exists."""
    from ufm.core.train import TrainingCancelled
    from ufm.runs.engine import wait_for
    from ufm.runs.store import Store

    cancel = (lambda: Path(stop_file).exists()) if stop_file else None
    if run_id is not None:
        report(f"training the ranking model (run {run_id}, on the Runs page)")
        with Store(home, recover=False) as store:
            rec = wait_for(store, [run_id], cancel=cancel, poll=0.5)[0]
        if rec.status != "done":
            raise TrainingCancelled(f"the ranking model's run {run_id} {rec.status}: {rec.error or 'cancelled'}")
    cached_influence(home, config, cancel=cancel,
                     progress=lambda p: report(background.progress_text(p, "training the ranking model",
                                                                   "scoring every training image")))


def start_ranking(config: ExperimentConfig) -> None:
    """Train the no-canary ranking model and score every image it trains on, off the server process."""
    key = ranking_config(config).key()
    stop = cancel_path(key)
    stop.unlink(missing_ok=True)
    run_id = state.executor().submit(ranking_run_config(config))
    background.tasks().submit(key, compute_ranking, config, str(state.store().home), str(stop), run_id)


def cancel_ranking(config: ExperimentConfig) -> None:
    """Ask the running ranking task of ``config`` to stop."""
    stop = cancel_path(ranking_config(config).key())
    private_dir(stop.parent)
    stop.touch(mode=0o600)


def correlation_warning(n: int) -> str | None:
    """A warning for a Pearson r from fewer than :data:`MIN_POINTS` canaries, else None."""
    if n >= MIN_POINTS:
        return None
    return (f"r from only {n} point{'s' if n != 1 else ''}: with so few canaries a large |r| and a small p arise "
            f"easily by chance (and p assumes normal data). Sweep at least {MIN_POINTS} canaries (the paper uses 30) "
            "before reading anything into it.")


def load_ranking(config: ExperimentConfig) -> pd.DataFrame | None:
    """The cached ranking of ``config``'s ranking model, or None (none yet, or a stale one)."""
    return load_influence_table(influence_path(state.store().home, ranking_config(config).key()), config)


def gallery(config: ExperimentConfig, table: pd.DataFrame, which: str, k: int) -> None:
    order = table.sort_values("rank", ascending=(which == "top")).head(k)
    idx = tuple(int(i) for i in order["index"])  # indices into the run's (stratified) training set
    x, _, classes = state.training_images(config.dataset, state.data_dir(), config.train_size, idx)
    cols = st.columns(min(k, 8))
    for j, (_, row) in enumerate(order.iterrows()):
        i = int(row["index"])
        cols[j % len(cols)].image(x[j].transpose(1, 2, 0), clamp=True, width=64,
                                  caption=f"#{int(row['rank'])} img {i} ({classes[int(row['label'])]}) "
                                          f"{row['self_influence']:.3g}")


def start_sweep(config: ExperimentConfig, table: pd.DataFrame, top: int, bottom: int) -> str:
    """One run per top-/bottom-k canary, as the sweep study ``ufm sweep-canaries`` uses; returns its name."""
    name = ensure_sweep_study(state.store(), config, table, top, bottom)
    submit_study(state.executor(), name)
    return name


def sweep_points(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """Per canary of the sweep: index, group, self-influence, run id, status, M, significant."""
    return sweep_rows(state.store(), name, table)
