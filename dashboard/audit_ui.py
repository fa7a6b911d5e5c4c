"""The "Audit a model" page's pieces: accepting an uploaded ONNX file, the inference images, the
background audit and the result view (also used by the Runs page's Audits section)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from ufm.audits.audit_images import audit_inference_images, check_npz_images
from ufm.audits.model_audit import ModelAuditConfig, ModelAuditResult
from ufm.audits.model_audit_report import model_audit_html
from ufm.audits.model_audit_store import (delete_model_audit, list_model_audits, load_model_audit, model_audit_task,
                                          new_model_audit_id)
from ufm.fileio import atomic_write, private_dir
from ufm.limits import MAX_ONNX_BYTES
from ufm.audits.onnx_input import GraphInput, graph_input, parse_onnx
from ufm.audits.onnx_model import CheckedModel, check_onnx
from ufm.reports.plots import histogram_figure

from . import access, background, state, views

MODEL = "audit_model"      # session key: {"path", "name", "sha256"} of the accepted model file
AUDIT = "audit_id"         # session key: the audit this session started or opened
HEADLINE_BOX = {"memorised": st.error, "not_shown": st.info, "inconclusive": st.warning}


def _audit_dir(home: str | Path, *parts: str) -> Path:
    d = Path(home) / "audits"
    for p in parts:
        d = d / p
    return private_dir(d)


def accept_upload(name: str, data: bytes, home: str | Path) -> tuple[Path, GraphInput]:
    """Check an uploaded ONNX file (size, format, one image input, no external data) before
    anything uses it, then keep it (0600) under ``home/audits/models/<sha256>.onnx``.

    Raises:
        OnnxModelError: the file is too large, not ONNX, or has an unsupported input or output.
    """
    from ufm.audits.onnx_input import OnnxModelError

    if len(data) > MAX_ONNX_BYTES:
        raise OnnxModelError(f"{name} is larger than {MAX_ONNX_BYTES / 2**20:.0f} MB (the limit for a model to audit)")
    path = _audit_dir(home, "models") / f"{hashlib.sha256(data).hexdigest()}.onnx"
    if path.is_file():  # accepted before (the page reruns on every click): checked when it was kept
        return path, graph_of(str(path), name)
    gi = graph_input(parse_onnx(data, name), name)
    atomic_write(path, data, private=True)
    return path, gi


@st.cache_resource(max_entries=8, show_spinner=False)
def graph_of(path: str, name: str) -> GraphInput:
    """The image input of a kept (already checked) model file."""
    return graph_input(parse_onnx(Path(path).read_bytes(), name), name)


def accept_path(path: Path, home: str | Path) -> tuple[Path, GraphInput]:
    """:func:`accept_upload` for a model file already on the server (an allowed path)."""
    from ufm.audits.onnx_input import read_model_bytes

    data, name = read_model_bytes(path)
    return accept_upload(name, data, home)


@st.fragment(run_every=2.0)
def progress(audit_id: str, home: str) -> None:
    """Live progress of a running audit; the whole page reruns once it has finished."""
    status, info = background.tasks().status(f"audit-{audit_id}")
    if status != "running":
        st.rerun()
    st.progress(0.5, text=f"auditing: {info or 'starting'}")
    if st.button("Cancel audit", key="audit_cancel"):
        cancel_audit(home, audit_id)


def accept_images(name: str, data: bytes, home: str | Path, shape: tuple[int, int, int] | None = None) -> Path:
    """Check an uploaded ``.npz`` of inference images in memory (read with ``allow_pickle=False``:
    uint8 ``x``, convertible to the model's ``shape``) and only then keep it (0600). A rejected
    upload leaves nothing on disk, and its message names the upload, never a server path."""
    check_npz_images(name, data, shape)
    path = _audit_dir(home, "images") / f"{hashlib.sha256(data).hexdigest()}.npz"
    if not path.is_file():
        atomic_write(path, data, private=True)
    return path


@st.cache_resource(max_entries=4, show_spinner="Checking the model ...")
def open_model(path: str, name: str, spec: tuple) -> CheckedModel:
    """The checked model and its input spec with the user's statements (``spec``: sorted (key,
    value) pairs for check_onnx). Never opened in onnxruntime here: the model runs only in the
    audit's own process, so a hostile graph cannot grow or crash the web server."""
    return check_onnx(path, name=name, **dict(spec))


@st.cache_data(max_entries=8, show_spinner="Loading inference images ...")
def preview_images(source: str, shape: tuple[int, int, int], n: int, root: str) -> np.ndarray:
    return audit_inference_images(source, shape, n, data_dir=root).numpy()


def start_audit(model_path: str, config: ModelAuditConfig, spec: dict, home: str, name: str,
                calibration: dict | None = None) -> str:
    """Queue the audit as a background task; returns its (future) audit id. ``name``: the file
    name the user knows (the kept copy is named by its hash). ``calibration``: shadow models or
    supplied references for a calibrated verdict (:func:`ufm.audits.shadow.shadow_audit_task`)."""
    audit_id = new_model_audit_id()
    spec = {**spec, "name": name}
    cancel = _audit_dir(home, "cancel") / audit_id
    if calibration:
        from ufm.audits.shadow import shadow_audit_task
        background.tasks().submit(f"audit-{audit_id}", shadow_audit_task, model_path, config.to_dict(), spec, home,
                                  audit_id, str(cancel), calibration)
    else:
        background.tasks().submit(f"audit-{audit_id}", model_audit_task, model_path, config.to_dict(), spec, home, audit_id,
                             str(cancel))
    return audit_id


def cancel_audit(home: str, audit_id: str) -> None:
    (_audit_dir(home, "cancel") / audit_id).touch(mode=0o600)


def model_audit_verdict(result: ModelAuditResult) -> None:
    """The model audit's verdict in its coloured box (headline, then its text), with the fast test's
    calibration below it."""
    v = result.verdict
    body = v.text
    for prefix in ("Inconclusive: ", "Provisional: "):  # the headline says it already
        body = body.removeprefix(prefix)
    HEADLINE_BOX[v.status](f"**{v.headline}.** {body}")
    if v.calibration:
        st.caption(v.calibration)


def audit_view(result: ModelAuditResult, audit_id: str) -> None:
    """Verdict, numbers, histogram, access gains and the HTML report of one audit."""
    s = result.summary()
    st.subheader(f"Audit {state.short(audit_id)} of {result.model_name}")
    spec = result.input_spec
    st.caption(f"{spec['layout']} {spec['channels']}x{spec['height']}x{spec['width']} · {result.num_classes} classes · "
               f"outputs read as {result.output_kind} · feature {result.config.feature.name} at "
               f"{result.config.feature.offset} · {result.n_ood} inference images from {result.config.ood} · "
               f"sha256 {result.model_sha256[:12]}")
    model_audit_verdict(result)
    c = st.columns(4)
    c[0].metric("M = X_u - X_r (nats)", views.fmt(s["M"]))
    c[1].metric("X_u (nats)", views.fmt(s["X_u"]))
    c[2].metric("X_r (nats)", views.fmt(s["X_r"]))
    c[3].metric("exposure p", views.fmt(s["exposure_p_value"], 3),
                help=f"rank {s['rank']} of {s['candidates'] + 1} candidate features ({s['family']})")
    c = st.columns(3)
    c[0].metric("t-test p (paper's statistic)", views.fmt(s["p_value"], 3))
    c[1].metric("paired t-test p", views.fmt(s["p_value_paired"], 3))
    c[2].metric("black-box gain", views.fmt(result.access.black_box_gain.gain, 3),
                help=f"class {result.access.black_box_gain.label}, calibrated p = "
                     f"{views.fmt(result.access.black_box_gain.p_value, 3)}")
    st.plotly_chart(histogram_figure(result.score.d_u, result.score.d_r, log_x=True), key=f"audit_hist_{audit_id}")
    with st.expander("Access settings (white-, grey-, black-box confidence gain)"):
        st.dataframe(views.access_table(result.access.to_dict()), hide_index=True)
    st.download_button("Download HTML report", model_audit_html(result, audit_id),
                       f"ufm-audit-{state.short(audit_id)}.html",
                       "text/html", key=f"audit_html_{audit_id}")


def audits_table(store) -> pd.DataFrame:
    return pd.DataFrame([r.to_row() for r in list_model_audits(store)])


def audits_section(store) -> None:
    """The Runs page's list of audits, with one opened below it."""
    table = audits_table(store)
    with st.expander(f"Audits of models you did not train ({len(table)})"):
        if table.empty:
            st.caption("None yet: audit an ONNX model on the Audit a model page or with `ufm audit`.")
            return
        st.dataframe(table, hide_index=True, width="stretch")
        pick = st.selectbox("open audit", list(table["id"]), key="runs_audit_pick",
                            format_func=lambda i: f"{state.short(i)} · {table.set_index('id').loc[i, 'model']}")
        audit_view(load_model_audit(store, pick), pick)
        if access.confirm_button("Delete audit", "runs_audit_delete", target=pick,
                                 prompt=f"Delete audit {state.short(pick)}? This cannot be undone."):
            delete_model_audit(store, pick)
            st.toast(f"Deleted audit {state.short(pick)}")
            st.rerun()


def calibration_inputs() -> dict | None:
    """The Audit page's calibration choice: None (the fast test, provisional), shadow models ufm
    trains (a bank of runs in the store, reused for every later feature), or a folder of reference
    models the user trained. Stops the page with one line on a path outside the allowed folders."""
    from ufm.audits.shadow import MISCALIBRATION_NOTE, ShadowRecipe
    from ufm.core.data import BENCHMARKS
    from ufm.limits import MAX_REFERENCES
    from ufm.paths import PathNotAllowed, check_user_path

    how = st.radio("Verdict", ["fast test (provisional)", "shadow models ufm trains", "reference models I trained"],
                   horizontal=True, key="audit_calibration",
                   help="A calibrated verdict ranks the model's M among models trained without the feature.")
    if how.startswith("fast"):
        return None
    try:
        if how.startswith("reference"):
            folder = st.text_input("folder of R >= 19 .onnx models trained without the feature (inside the allowed "
                                   "data folders)", key="audit_refs")
            return {"references_from": str(check_user_path(folder))} if folder.strip() else None
        st.caption("Shadows are trained with ufm's training code (Adam, early stopping) on your labelled data, "
                   "assuming the model was trained on similar data with a similar recipe. " + MISCALIBRATION_NOTE)
        data = st.text_input("labelled shadow data: a benchmark name, or a folder (class sub-folders, or "
                             "train.npz/test.npz) inside the allowed data folders", key="audit_shadow_data")
        if not data.strip():
            return None
        source = data.strip() if data.strip() in BENCHMARKS else str(check_user_path(data))
        c = st.columns(5)
        d = ShadowRecipe()
        recipe = ShadowRecipe(lr=c[0].number_input("Adam lr", 1e-6, 1.0, d.lr, format="%g", key="audit_sh_lr"),
                              batch_size=int(c[1].number_input("batch", 1, 4096, d.batch_size, key="audit_sh_b")),
                              epochs=int(c[2].number_input("max epochs", 1, 1000, d.epochs, key="audit_sh_e")),
                              patience=int(c[3].number_input("patience", 1, 100, d.patience, key="audit_sh_p")))
        r = int(c[4].number_input("shadows R", 19, MAX_REFERENCES, 39, key="audit_sh_r"))
        return {"shadow_data": source, "references": r, "recipe": {**recipe.__dict__, "regularisers": []}}
    except PathNotAllowed as e:
        st.error(str(e))
        st.stop()
