"""Widgets of the Train & measure page: the setup form and the canary chooser with its gallery."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from ufm.core.canary import CanaryChoice
from ufm.core.experiment import ExperimentConfig
from ufm.core.models import ARCHITECTURES
from ufm.paths import PathNotAllowed, check_user_path
from ufm.reports.plots import image_figure
from ufm.core.train import REGULARISERS, DPConfig

from . import state

CANARY_MODES = ["pick an image", "random", "by class", "by self-influence rank", "none (clean control)"]
GALLERY = 24


def setup_form() -> dict:
    """Dataset, architecture, regularisers and budget; returns the new setup dict.

    Raises:
        PathNotAllowed: the typed data path is outside the allowed data folders (shown by the page).
    """
    s = dict(state.current_setup())
    choices = state.dataset_choices() + ["your own data (a folder or .npz pair)"]
    ds = s["dataset"] if s["dataset"] in choices else choices[-1]
    c1, c2, c3 = st.columns(3)
    pick = c1.selectbox("dataset", choices, index=choices.index(ds), key="tr_dataset")
    refused = None
    if pick == choices[-1]:
        typed = c1.text_input("path to your data", s["dataset"] if ds == choices[-1] else "", key="tr_path",
                              help="A folder with train.npz and test.npz, or a folder of class sub-folders of "
                                   "images, inside the data folders the operator allows.")
        try:  # before anything lists or loads it: the server's file system is not the user's
            pick = str(check_user_path(typed))
        except PathNotAllowed as e:
            refused, pick = e, s["dataset"] if s["dataset"] in choices[:-1] else choices[0]
    s["dataset"] = pick
    s["arch"] = c2.selectbox("architecture", ARCHITECTURES, index=ARCHITECTURES.index(s["arch"]), key="tr_arch")
    s["regularisers"] = c3.multiselect("regularisers", [r for r in REGULARISERS if r != "none"],
                                       default=s["regularisers"], key="tr_regs")
    budget = st.radio("budget", ["Quick (a demo on a CPU)", "Paper (500 epochs, patience 10, all images)"],
                      horizontal=True, key="tr_budget")
    s.update(state.QUICK if budget.startswith("Quick") else state.PAPER)
    dp_on = "dp-sgd" in s["regularisers"]
    with st.expander("Advanced"):
        a = st.columns(4)
        s["epochs"] = a[0].number_input("max epochs", 1, 500, s["epochs"], key="tr_epochs", disabled=dp_on,
                                        help="With DP-SGD the epoch budget in the DP-SGD settings applies.")
        s["patience"] = a[1].number_input("patience (epochs)", 1, 100, s["patience"], key="tr_patience")
        ts = a[2].number_input("training images (0 = all)", 0, 60000, s["train_size"] or 0, step=500, key="tr_size")
        s["train_size"] = int(ts) or None
        s["ood_size"] = a[3].number_input("inference images", 10, 10000, s["ood_size"], key="tr_ood")
        b = st.columns(4)
        s["seed"] = b[0].number_input("seed", 0, 10_000, s.get("seed", 0), key="tr_seed")
        s["candidates"] = b[1].number_input("exposure candidates K", 9, 999, s.get("candidates") or 99, key="tr_k")
        lr = b[2].number_input("learning rate (0 = paper's)", 0.0, 1.0, s.get("lr") or 0.0, format="%.5f", key="tr_lr")
        s["lr"] = lr or None
        s["device"] = b[3].selectbox("device", ["auto", "cpu", "cuda", "mps"], key="tr_device")
    if dp_on:
        dp_settings(s)
    if refused is not None:
        raise refused  # after the other widgets, so the form keeps its shape
    return s


def dp_settings(s: dict) -> None:
    """The DP-SGD block: the shared DP widget (:func:`dashboard.dp_ui.dp_widget`) and the epoch budget.
    Sets ``s["dp"]`` (a :class:`ufm.core.train.DPConfig`, dropped when refused) and ``s["epochs"]``."""
    from .dp_ui import dp_widget

    with st.container(border=True):
        st.markdown("**DP-SGD settings** (Opacus). A DP run trains the whole epoch budget (no early stopping), "
                    "so a target epsilon sets the noise for exactly those epochs; the result reports the "
                    "epsilon actually spent.")
        dp = dp_widget("tr", initial=s.get("dp") if isinstance(s.get("dp"), DPConfig) else None,
                       train_size=s.get("train_size"))
        s["epochs"] = int(st.number_input("epoch budget (all epochs run)", 1, 500, int(s["epochs"]),
                                          key="tr_dp_epochs"))
        if dp is None:
            s.pop("dp", None)
        else:
            s["dp"] = dp


MODE_OF = {"index": "pick an image", "random": "random", "class": "by class", "none": "none (clean control)"}


def _use(i: int) -> None:
    """Callback of a gallery image's "use": the number box is the one place the index lives."""
    st.session_state["tr_index"] = i


def canary_chooser(setup: dict) -> CanaryChoice:
    """How the canary is chosen: gallery click, random, by class, by self-influence, or none.

    The widgets start from ``setup["canary"]`` (the current setup), so leaving the page and coming
    back, or reloading, shows the canary that the next run will use.
    """
    ss = st.session_state
    chosen = setup.get("canary") or CanaryChoice("index", (0,))
    if "tr_canary_mode" not in ss:
        ss["tr_canary_mode"] = MODE_OF[chosen.mode]
        if chosen.mode == "index":
            ss["tr_index"] = chosen.indices[0]
        elif chosen.mode == "random":
            ss["tr_count"] = chosen.count
        elif chosen.mode == "class":
            ss["tr_class"], ss["tr_class_count"] = chosen.label, chosen.count
    mode = st.radio("canary", CANARY_MODES, horizontal=True, key="tr_canary_mode")
    if mode == "none (clean control)":
        st.caption("No training image carries the feature (the control): its verdict should not say memorised.")
        return CanaryChoice("none", ())
    if mode == "random":
        ss.setdefault("tr_count", 1)
        k = st.number_input("how many canaries (the canary frequency)", 1, 1000, key="tr_count")
        return CanaryChoice("random", (), count=int(k))
    # a gallery spread over every class (seeded): the first images of a class-sorted set are one class
    shown = state.gallery_indices(setup["dataset"], state.data_dir(), setup.get("train_size"), GALLERY)
    x, y, classes = state.training_images(setup["dataset"], state.data_dir(), setup.get("train_size"), shown)
    if mode == "by class":
        c1, c2 = st.columns(2)
        if ss.get("tr_class") is not None and not 0 <= ss["tr_class"] < len(classes):
            ss.pop("tr_class")  # a class of another dataset
        label = c1.selectbox("class", range(len(classes)), format_func=lambda i: classes[i], key="tr_class")
        ss.setdefault("tr_class_count", 1)
        k = c2.number_input("how many canaries of that class", 1, 1000, key="tr_class_count")
        return CanaryChoice("class", (), count=int(k), label=int(label))
    if mode == "by self-influence rank":
        return _by_influence(setup)
    ss.setdefault("tr_index", 0)
    # bounded by this training set, not by the largest dataset (59,999 was accepted on a 200-image set)
    last = state.training_set_size(setup["dataset"], state.data_dir(), setup.get("train_size")) - 1
    if ss["tr_index"] > last:
        st.warning(f"Canary image {ss['tr_index']} is past this training set's {last + 1} images: "
                   f"the canary is now image {last}.")
        ss["tr_index"] = last
    idx = int(st.number_input("canary image index", 0, last, key="tr_index",
                              help=f"The training image that carries the feature (0 to {last}); the gallery sets "
                                   "this box."))
    with st.popover("Pick from a gallery of training images (every class)"):
        for pos, i in enumerate(shown[:len(x)]):
            if pos % 8 == 0:  # one row of columns per 8 images: reading and tab order run row by row
                cols = st.columns(8)
            with cols[pos % 8]:
                st.image(x[pos].transpose(1, 2, 0), caption=f"{i}: {classes[y[pos]]}", clamp=True, width=56)
                st.button("use", key=f"tr_use_{i}", on_click=_use, args=(i,),
                          type="primary" if i == idx else "secondary")
    return CanaryChoice("index", (idx,))


def _by_influence(setup: dict) -> CanaryChoice:
    from ufm.attribution.sweep import ranking_config

    ref = ranking_config(state.config_from_setup(setup)).key()
    path = state.influence_path(ref)
    if not Path(path).exists():
        st.info("No self-influence ranking for this dataset, architecture and budget yet: compute it on the "
                "Influence page first. Until then the canary is image 0.")
        return CanaryChoice("index", (0,))
    table = pd.read_csv(path).sort_values("rank")
    rank = st.number_input("self-influence rank (0 = most influential)", 0, len(table) - 1, 0, key="tr_rank")
    row = table.iloc[int(rank)]
    classes = state.training_images(setup["dataset"], state.data_dir(), setup.get("train_size"), (0,))[2]
    label = int(row["label"])
    st.caption(f"rank {int(rank)}: image {int(row['index'])} ({classes[label] if label < len(classes) else label}, "
               "self-influence "
               f"{row['self_influence']:.4g})")
    return CanaryChoice("index", (int(row["index"]),))


def canary_preview(setup: dict, choice: CanaryChoice) -> None:
    if choice.mode != "index":
        return
    i = choice.indices[0]
    x, y, classes = state.training_images(setup["dataset"], state.data_dir(), setup.get("train_size"), (i,))
    if not len(x):
        st.warning(f"Image {i} is past the {setup.get('train_size')} training images: pick a smaller index.")
        return
    f = state.current_feature()
    from ufm.core.canary import stamp_feature
    import torch
    img = stamp_feature(torch.from_numpy(x[:1]), f)[0].numpy()
    st.plotly_chart(image_figure(img, box=(*f.offset, *f.size), title=f"canary {i} ({classes[y[0]]}) with {f.name}"),
                    key="tr_canary_preview")


def map_hint(config: ExperimentConfig) -> None:
    """Before Start: how often one canary was detected in the nearest measured setting (the
    memorisation map), so a 'not shown' does not surprise anyone who chose a setting where one
    canary is mostly below detection."""
    from ufm.measure.memorisation_map import nearest_cell
    from ufm.core.train import resolve_device

    try:
        device = "cuda" if resolve_device(config.device).type == "cuda" else "cpu"
    except ValueError:
        device = "cpu"
    near = nearest_cell(config, device)
    if near is None:
        if config.canary.mode != "none":
            st.caption("The memorisation map has no measurement for this dataset: how often one canary is detected "
                       "here is unknown (benchmarks/memorisation_map.py measures it).")
        return
    st.info(near.text() + " Atypical training images are memorised more often than typical ones.",
            icon=":material/map:")
