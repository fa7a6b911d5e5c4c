"""Feature: design the unique feature z_u and see it on a training and an inference image."""

import streamlit as st
import torch

from dashboard import state
from dashboard.feature_ui import KINDS, NoUpload, build_feature, init_widgets
from ufm.canary import stamp_feature
from ufm.data import DataUnavailable
from ufm.features import FeatureError
from ufm.plots import image_figure, zoom_figure

st.title("Design the unique feature")
st.write("The feature is pasted, opaque, onto the canary image(s) for training, and onto every "
         "inference image to measure memorisation. The current feature is used by every page.")
current = state.current_feature()
# The page opens (or reloads): its widgets show the feature in use; later, any widget whose value
# Streamlit dropped comes back from the feature in use.
init_widgets(current, only_missing="feat_kind" in st.session_state)
left, right = st.columns([1, 1])
with left:
    kind = st.radio("kind", KINDS, horizontal=True, key="feat_kind")
    feature = None
    try:
        base = build_feature(kind)
    except NoUpload:
        st.info(f"Upload an image to turn it into a feature; the current feature ({current.name}) stays in use "
                "meanwhile.")
        base = None
    except FeatureError as e:
        st.error(f"{e}. The current feature ({current.name}) is kept.")
        base = None
    # always drawn, also while the pattern is refused: a widget left out of one run loses its value
    r, c = st.columns(2)
    row = r.number_input("row of the top-left pixel", 0, 200, current.offset[0], key="feat_row")
    col = c.number_input("column of the top-left pixel", 0, 200, current.offset[1], key="feat_col")
    intensity = st.slider("intensity (1 = white)", 0.05, 1.0, min(1.0, max(0.05, round(current.intensity * 20) / 20)),
                          step=0.05, key="feat_intensity")
    if base is not None:
        try:
            feature = base.with_offset(int(row), int(col)).with_intensity(float(intensity))
        except FeatureError as e:
            st.error(f"{e}. The current feature ({current.name}) is kept.")

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
            st.success(f"In use: {feature.name}, {h}x{w} pixels at row {feature.offset[0]}, column "
                       f"{feature.offset[1]}, intensity {feature.intensity:g}.")
        else:
            st.caption(f"In use: {current.name}, {h}x{w} pixels at row {current.offset[0]}, column "
                       f"{current.offset[1]}.")
    except FeatureError as e:
        st.error(f"{e}. The current feature ({current.name}) is kept.")
    except DataUnavailable as e:
        st.error(str(e))
