"""Audit a model: the black-box memorisation test of an ONNX classifier ufm did not train."""

import streamlit as st

from dashboard import audit_ui, background, state
from ufm.audits.audit_images import default_inference_source
from ufm.audits.model_audit import ModelAuditConfig, stamped_examples
from ufm.audits.model_audit_store import load_model_audit
from ufm.core.data import DataUnavailable
from ufm.core.features import FeatureError
from ufm.limits import MAX_INPUT_SIDE, MAX_ONNX_BYTES, MAX_OOD_SIZE, MAX_UPLOAD_MB, max_images
from ufm.audits.onnx_input import OnnxModelError
from ufm.paths import PathNotAllowed, check_user_path
from ufm.runs.store import StoreError

st.title("Audit a model")
st.caption("Does a classifier you did not train react to a unique feature, e.g. a patient's name? Upload it as "
           "ONNX (it runs in onnxruntime, never unpickled), choose inference images, and ufm measures it with the "
           "same statistics as a trained run. The verdict is the fast exposure test where the calibration study "
           "found it calibrated for the feature's kind; otherwise the audit says so instead of giving one.")
store = state.store()
home = str(store.home)

up = st.file_uploader("ONNX model (.onnx)", type=["onnx"], key="audit_upload",
                      help=f"Uploads up to {MAX_UPLOAD_MB} MB. A larger model (up to {MAX_ONNX_BYTES // 2**20} MB): put "
                           "it in a folder the operator allowed and give its path below.")
typed = st.text_input("or the path of a model file on the server (inside the allowed data folders)",
                      key="audit_model_path")
try:
    if up is not None:
        path, gi = audit_ui.accept_upload(up.name, up.getvalue(), home)
        st.session_state[audit_ui.MODEL] = {"path": str(path), "name": up.name}
    elif typed.strip():
        p = check_user_path(typed)
        path, gi = audit_ui.accept_path(p, home)
        st.session_state[audit_ui.MODEL] = {"path": str(path), "name": p.name}
except (OnnxModelError, PathNotAllowed) as e:
    st.session_state.pop(audit_ui.MODEL, None)
    st.error(str(e))
    st.stop()
chosen = st.session_state.get(audit_ui.MODEL)
if not chosen:
    st.info("Upload an .onnx file to begin. To try it on a model known to have memorised, export a finished run: "
            "`ufm runs export ID --format onnx --out model.onnx`.")
    st.stop()
gi = audit_ui.graph_of(chosen["path"], chosen["name"])
c, h, w = gi.chw()

st.subheader("Model input")
cols = st.columns(4)
layout = cols[0].selectbox("layout", ["NCHW", "NHWC"], index=0 if gi.layout == "NCHW" else 1, key="audit_layout")
chans = cols[1].selectbox("channels", [1, 3], index=0 if (c or 1) == 1 else 1, key="audit_channels",
                          disabled=c is not None)
height = cols[2].number_input("height", 1, MAX_INPUT_SIDE, h or 28, key="audit_h", disabled=h is not None)
width = cols[3].number_input("width", 1, MAX_INPUT_SIDE, w or 28, key="audit_w", disabled=w is not None)
norm = st.columns(2)
mean_txt = norm[0].text_input("normalisation mean (per channel, comma-separated; empty = none)", key="audit_mean",
                              help="The model's input is (pixel - mean) / std with pixels in [0, 1]. A file exported "
                                   "by ufm carries its own; leave empty to use it.")
std_txt = norm[1].text_input("normalisation std", key="audit_std")
try:
    mean = tuple(float(v) for v in mean_txt.split(",") if v.strip()) or None
    std = tuple(float(v) for v in std_txt.split(",") if v.strip()) or None
except ValueError:
    st.error("mean and std must be numbers separated by commas, e.g. 0.485, 0.456, 0.406")
    st.stop()
spec = {"layout": layout, "channels": None if c is not None else int(chans),
        "input_size": None if h is not None and w is not None else (int(height), int(width)), "mean": mean, "std": std}
spec = {k: v for k, v in spec.items() if v is not None}
try:
    model = audit_ui.open_model(chosen["path"], chosen["name"], tuple(sorted(spec.items())))
except OnnxModelError as e:
    st.error(str(e))
    st.stop()
st.caption(f"{chosen['name']}: {model.spec.describe()} · sha256 {model.sha256[:12]}"
           + (" · normalisation read from the file's ufm metadata" if model.spec.normalised and not mean else ""))

st.subheader("Feature and inference images")
feature = state.current_feature()
try:
    feature.check_fits(model.spec.shape)
except FeatureError as e:
    st.error(f"{e} (design the feature on the Feature page)")
    st.stop()
source_kind = st.radio("inference images", ["a dataset", "a folder or .npz on the server", "upload an .npz"],
                       horizontal=True, key="audit_source_kind")
source = None
try:
    if source_kind == "a dataset":
        choices = state.dataset_choices()
        default, why = default_inference_source(model.spec.shape[0], gi.metadata.get("ufm.dataset"))
        if st.session_state.get("audit_dataset") not in choices:
            st.session_state["audit_dataset"] = default if default in choices else choices[0]
        source = st.selectbox("dataset (its test split)", choices, key="audit_dataset")
        if source == default:
            st.caption(f"Default: {why}.")
        else:
            st.caption(f"The paper's choice would be {default} ({why}).")
    elif source_kind == "a folder or .npz on the server":
        text = st.text_input("path (inside the allowed data folders)", key="audit_source_path")
        source = str(check_user_path(text)) if text.strip() else None
    else:
        npz = st.file_uploader("images as .npz (uint8 array x)", type=["npz"], key="audit_npz")
        source = (str(audit_ui.accept_images(npz.name, npz.getvalue(), home, model.spec.shape)) if npz is not None
                  else None)
except (PathNotAllowed, ValueError, DataUnavailable) as e:
    st.error(str(e))
    st.stop()
if not source:
    st.info("Choose the inference images.")
    st.stop()
a, b, c2 = st.columns(3)
most = max(2, min(MAX_OOD_SIZE, max_images(model.spec.shape)))  # the memory bound, see ufm.limits
if st.session_state.get("audit_n", 0) > most:  # chosen for a smaller model: a widget above its max fails
    st.session_state["audit_n"] = most
n = a.number_input("inference images", 2, most, min(500, most), key="audit_n",
                   help=f"at most {most} for this model's input size")
k = b.number_input("candidate features K", 1, 2000, 99, key="audit_k")
seed = c2.number_input("seed", 0, 2**31 - 1, 0, key="audit_seed")
try:
    x = audit_ui.preview_images(source, model.spec.shape, min(int(n), 4), state.data_dir())
except (DataUnavailable, ValueError) as e:
    st.error(str(e))
    st.stop()
import torch  # noqa: E402 - only past the checks above

st.caption(f"The feature ({feature.name}) stamped on the first inference images, in the model's input size: "
           "check its placement and scale.")
st.image([im.transpose(1, 2, 0) if im.shape[0] == 3 else im[0]
          for im in stamped_examples(torch.from_numpy(x), feature)], width=96, clamp=True)

calibration = audit_ui.calibration_inputs()  # None: the fast test only (provisional)
if st.button("Run audit", type="primary", key="audit_run"):
    try:
        config = ModelAuditConfig(feature, source, ood_size=int(n), candidates=int(k), seed=int(seed),
                                  data_dir=state.data_dir())
    except ValueError as e:
        st.error(str(e))
        st.stop()
    st.session_state[audit_ui.AUDIT] = audit_ui.start_audit(chosen["path"], config, spec, home, chosen["name"],
                                                            calibration)

audit_id = st.session_state.get(audit_ui.AUDIT)
if audit_id:
    status, info = background.tasks().status(f"audit-{audit_id}")
    if status == "running":
        audit_ui.progress(audit_id, home)
    elif status == "failed":
        st.error(f"The audit stopped: {info}. Nothing was stored.")
    else:
        try:
            audit_ui.audit_view(load_model_audit(store, audit_id), audit_id)
        except StoreError:  # not recorded (another server's task, or deleted): forget it
            st.session_state.pop(audit_ui.AUDIT, None)
