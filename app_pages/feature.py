"""Feature: design the unique feature z_u and see it on a training and an inference image."""

import streamlit as st
import torch

from dashboard import state
from dashboard.feature_ui import (KIND_OF, KINDS, NoUpload, adopt, build_feature, init_widgets, make_own, own_value,
                                  remember, switch_kind)
from ufm.core.canary import stamp_feature
from ufm.core.data import DataUnavailable
from ufm.core.features import FeatureError
from ufm.reports.plots import image_figure, zoom_figure

st.title("Design the unique feature")
st.write("The feature is pasted, opaque, onto the canary image(s) for training, and onto every "
         "inference image to measure memorisation. The current feature is used by every page.")
current = state.current_feature()
# The page opens (or reloads): its widgets show the feature in use; later, any widget whose value
# Streamlit dropped comes back from the feature in use.
init_widgets(current, only_missing="feat_kind" in st.session_state)
if own_value(KIND_OF.get(current.kind, "Draw")) is None:
    remember(current)  # the feature in use is its kind's own value (e.g. restored from a link)
left, right = st.columns([1, 1])
with left:
    kind = st.radio("kind", KINDS, horizontal=True, key="feat_kind")
    switch_kind(kind)  # the kind's widgets come back from its own last value
    feature = None
    try:
        base = build_feature(kind)
    except NoUpload:
        st.info(f"Upload an image to turn it into a feature; the current feature ({current.name}) stays in use "
                "meanwhile.")
        base = None
    except FeatureError as e:
        if kind == "Draw" and own_value("Draw") is None:  # a blank canvas not drawn on yet: nothing to refuse
            st.info(f"Draw on the canvas or tick pixels; the current feature ({current.name}) stays in use "
                    "meanwhile.")
        else:
            st.error(f"{e}. The current feature ({current.name}) is kept.")
        base = None
    # always drawn, also while the pattern is refused: a widget left out of one run loses its value
    r, c = st.columns(2)
    row = r.number_input("row of the top-left pixel", 0, 200, current.offset[0], key="feat_row")
    col = c.number_input("column of the top-left pixel", 0, 200, current.offset[1], key="feat_col")
    intensity = st.slider("intensity (1 = white)", 0.05, 1.0, min(1.0, max(0.05, round(current.intensity * 20) / 20)),
                          step=0.05, key="feat_intensity")
    pending = None  # the kind's feature while it is only shown, not in use
    if base is not None:
        try:
            feature = base.with_offset(int(row), int(col)).with_intensity(float(intensity))
        except FeatureError as e:
            st.error(f"{e}. The current feature ({current.name}) is kept.")
        if feature is not None and not adopt(kind, base):
            pending, feature = feature, None
    if pending is not None:
        st.info(f"Showing the {kind.lower()} defaults ({pending.name}); the current feature ({current.name}) stays "
                "in use until you change them or press **Use this feature**.")
        st.button("Use this feature", key="feat_use", on_click=make_own, args=(kind, pending))
        try:  # a new position or intensity applies to the feature in use
            moved = current.with_offset(int(row), int(col)).with_intensity(float(intensity))
        except FeatureError:
            moved = current
        if moved != current:
            state.set_feature(moved)
            current = moved
    kept = [(k, own_value(k)) for k in KINDS if k != kind and own_value(k) is not None]
    if kept and feature is not None:
        # the undo of a kind switch: what the other kinds held is kept, one click away
        st.caption("Kept in this session (switch the kind to use it again): "
                   + "; ".join(f"{k}: {f.name}" for k, f in kept) + ".")

with right:
    choices = state.dataset_choices()
    setup = state.current_setup()
    ds = st.selectbox("preview on dataset", choices, index=choices.index(setup["dataset"]) if setup["dataset"] in choices else 0,
                      key="feat_dataset")
    try:
        x, y, classes = state.images(ds, "train", state.data_dir(), 64)
        i = st.number_input("training image", 0, len(x) - 1, 0, key="feat_preview_index")
        shown = feature or current
        shown.check_fits(x.shape)
        h, w = shown.size
        box = (*shown.offset, h, w)
        ood = state.ood_preview(ds, tuple(x.shape[1:]), state.data_dir())
        stamped = stamp_feature(torch.from_numpy(x[i:i + 1]), shown)[0].numpy()
        a, b = st.columns(2)
        a.plotly_chart(image_figure(stamped, box=box, title=f"training image {i} ({classes[y[i]]})"), key="prev_train")
        b.plotly_chart(image_figure(stamp_feature(torch.from_numpy(ood[:1]), shown)[0].numpy(), box=box,
                                    title="inference image (OOD)"), key="prev_ood")
        st.plotly_chart(zoom_figure(stamped, box, title="the stamped region up close (one square = one pixel)"),
                        key="prev_zoom")
        if feature is not None:
            state.set_feature(feature)
            remember(feature)
            st.success(f"In use: {feature.name}, {h}x{w} pixels at row {feature.offset[0]}, column "
                       f"{feature.offset[1]}, intensity {feature.intensity:g}.")
        else:
            st.caption(f"In use: {current.name}, {h}x{w} pixels at row {current.offset[0]}, column "
                       f"{current.offset[1]}.")
    except FeatureError as e:
        st.error(f"{e}. The current feature ({current.name}) is kept.")
    except DataUnavailable as e:
        st.error(str(e))
