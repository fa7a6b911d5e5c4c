"""The Influence page's pieces: computing the ranking in the background, the gallery, the sweep."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ufm.canary import CanaryChoice
from ufm.fileio import atomic_write
from ufm.experiment import ExperimentConfig
from ufm.studies import StudyMember, StudyNotFound, create_study, get_study, runs_frame, submit_study
from ufm.sweep import influence_scores, reference_config

from . import state


def compute_ranking(report, config: ExperimentConfig, path: str) -> None:
    """The background task (its own process, see ``state.Tasks``): self-influence to ``path``."""
    infl = influence_scores(config, progress=lambda p: report(
        f"epoch {p.epoch}" if p.phase == "train" else p.message))
    atomic_write(path, infl.table().to_csv(index=False))


def start_ranking(config: ExperimentConfig) -> None:
    """Train the no-canary reference model and score every training image, off the server process."""
    key = reference_config(config).key()
    state.tasks().submit(key, compute_ranking, config, str(state.influence_path(key)))


def load_ranking(config: ExperimentConfig) -> pd.DataFrame | None:
    path = state.influence_path(reference_config(config).key())
    return pd.read_csv(path) if path.exists() else None


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
    """One run per top-/bottom-k canary, as a study; returns its name."""
    order = table.sort_values("rank")
    chosen = [(int(i), "top") for i in order["index"].head(top)] + [(int(i), "bottom") for i in order["index"].tail(bottom)[::-1]]
    members = [StudyMember(group, config.replace(canary=CanaryChoice("index", (i,)))) for i, group in chosen]
    name = f"sweep {reference_config(config).key()[:8]} top{top} bottom{bottom} feature {config.feature.name} seed {config.seed}"
    try:
        get_study(state.store(), name)
    except StudyNotFound:
        create_study(state.store(), name, "canaries", config, members,
                     description=f"top-{top} and bottom-{bottom} self-influence canaries")
    submit_study(state.runner(), name)
    return name


def sweep_points(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """Per canary of the sweep: index, group, self-influence, run id, status, M."""
    study = get_study(state.store(), name)
    runs = runs_frame(state.store(), name).set_index("position")
    infl = table.set_index("index")
    rows = []
    for e in study.entries:
        i = e.config.canary.indices[0]
        r = runs.loc[e.position]
        rows.append(dict(index=i, group=e.group, self_influence=float(infl.loc[i, "self_influence"]),
                         run_id=r["run_id"], status=r["status"], M=r["M"], significant=r["significant"]))
    return pd.DataFrame(rows)
