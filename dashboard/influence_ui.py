"""The Influence page's pieces: computing the ranking in the background, the gallery, the sweep.

The ranking and the sweep are those of ``ufm sweep-canaries`` (:mod:`ufm.sweep`): the table is
cached under the store's home by the reference config key, the sweep is a study in the store.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ufm.experiment import ExperimentConfig
from ufm.studies import submit_study
from ufm.sweep import cached_influence, ensure_sweep_study, influence_path, load_influence_table, reference_config, sweep_rows

from . import state


def compute_ranking(report, config: ExperimentConfig, home: str) -> None:
    """The background task (its own process, see ``state.Tasks``): the cached self-influence table."""
    cached_influence(home, config, progress=lambda p: report(f"epoch {p.epoch}" if p.phase == "train" else p.message))


def start_ranking(config: ExperimentConfig) -> None:
    """Train the no-canary reference model and score every image it trains on, off the server process."""
    key = reference_config(config).key()
    state.tasks().submit(key, compute_ranking, config, str(state.store().home))


def load_ranking(config: ExperimentConfig) -> pd.DataFrame | None:
    """The cached ranking of ``config``'s reference model, or None (none yet, or a stale one)."""
    return load_influence_table(influence_path(state.store().home, reference_config(config).key()), config)


def gallery(config: ExperimentConfig, table: pd.DataFrame, which: str, k: int) -> None:
    order = table.sort_values("rank", ascending=(which == "top")).head(k)
    x, _, classes = state.images(config.dataset, "train", state.data_dir(), int(order["index"].max()) + 1)
    cols = st.columns(min(k, 8))
    for j, (_, row) in enumerate(order.iterrows()):
        i = int(row["index"])
        cols[j % len(cols)].image(x[i].transpose(1, 2, 0), clamp=True, width=64,
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
