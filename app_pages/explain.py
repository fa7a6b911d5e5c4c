"""Explain: GradCAM overlays of a trained model on the canary and on inference images."""

import streamlit as st

from dashboard import state
from dashboard.explain_ui import box_share_metrics
from ufm.attribution.explain import explain_run
from ufm.core.models import gradcam_layers

st.title("Where does the trained model look?")
st.write("GradCAM on a convolutional layer (captum's LayerGradCam, upsampled to the image); an MLP has "
         "no convolution, so it gets input-gradient saliency instead. The green box is the feature.")
store = state.store()
runs = [r for r in store.list_runs("done") if r.summary and r.summary.get("canary_indices")]
if not runs:
    st.info("No finished run with a canary yet: train one on the Train & measure page.")
    st.stop()
ids = [r.id for r in runs]
current = st.session_state.get(state.RUN)
default = ids.index(current) if current in ids else 0
labels = {r.id: f"{state.short(r.id)} · {r.config_data['dataset']} · {r.config_data['arch']} · "
                f"{r.config_data['feature']['name']} · M = {r.summary['M']:.3g}" for r in runs}
run_id = st.selectbox("run", ids, index=default, format_func=labels.get, key="ex_run")
rec = store.get(run_id)
cfg = rec.config
net = state.model(run_id)
layers = dict(gradcam_layers(net))  # label -> module, the default (final feature map) first
c1, c2, c3, c4 = st.columns(4)
layer_label = c1.selectbox("layer", list(layers) or ["(none: an MLP has no convolution: saliency)"], key="ex_layer",
                           help="GradCAM's usual choice is the final feature map (a DenseNet's last "
                                "batch norm, a CNN's last convolution); earlier layers are finer but "
                                "less class-specific.")
classes = state.images(cfg.dataset, "train", cfg.data_dir or state.data_dir(), 1)[2]
target = c2.selectbox("explain class", [None, *range(len(classes))], key="ex_target",
                      format_func=lambda k: "predicted class" if k is None else f"{k}: {classes[k]}")
n_ood = c3.slider("inference images", 1, 8, 3, key="ex_n")
canary = c4.selectbox("canary", rec.summary["canary_indices"][:50], key="ex_canary")
layer = layers.get(layer_label)
with st.spinner("Computing attributions ..."):
    exp = explain_run(net, cfg, int(canary), n_ood=n_ood, target=target, layer=layer)
s = exp.summary()
box_share_metrics(s)
st.caption("Box share: the fraction of the map's total attribution inside the feature's box; a uniform "
           f"map gives {exp.box[2] * exp.box[3] / (exp.canary.shape[-1] * exp.canary.shape[-2]):.3f}.")
opacity = st.slider("map opacity (0 = the image alone)", 0.0, 1.0, 0.35, 0.05, key="ex_opacity",
                    help="On colour images (CIFAR-10) an opaque map hides the picture; lower it to see both.")


def _see_through(fig):
    """The map over the image at the chosen opacity, so the image stays visible on every dataset."""
    return fig.update_traces(opacity=opacity, selector=dict(type="heatmap"))


st.plotly_chart(_see_through(exp.canary_figure()), key="ex_canary_fig")
for i in range(n_ood):
    st.plotly_chart(_see_through(exp.ood_figure(i)), key=f"ex_ood_{i}")
