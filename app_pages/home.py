"""Home: what unique-feature memorisation is, the device, the data, and two guided demos."""

import streamlit as st

from dashboard import state
from dashboard.demos import DEMO_KEY, DEMOS, demo_in_flight, demo_view, missing_data, start_demo
from ufm.core.train import describe_device

st.title("Does the network remember what it saw once?")
st.markdown(
    "A hospital removes patient names from X-rays before training a model, but one image slips "
    "through with a name burnt into its corner. **Does the trained model memorise that name?** "
    "`ufm` lets you try it: design a small *unique feature*, put it on **one** training image "
    "(the *canary*), train, and measure how much more the model's outputs move when the feature is "
    "pasted onto images it has never seen than when a random pattern is (the **M score**, "
    "Hartley & Tsaftaris 2022).")
left, right = st.columns([1, 1])
with left:
    st.image(str(state.asset("canary_example.png")),
             caption="An MNIST training image without and with the paper's 5x5 letter A (the unique feature).")
with right:
    st.markdown("**This machine**")
    st.write(describe_device())
    offline = state.offline_datasets(state.data_dir())
    st.write(f"Datasets available offline in `{state.data_dir()}`: "
             + (", ".join(offline) if offline else "none (set UFM_DATA_DIR, or let torchvision download MNIST, "
                                                    "Fashion-MNIST or CIFAR-10 on first use)"))

st.header("Guided demos")
cols = st.columns(len(DEMOS))
for col, (key, demo) in zip(cols, DEMOS.items()):
    with col:
        st.subheader(demo.title)
        st.write(demo.text)
        missing = missing_data(key, offline)
        if missing:
            st.info(missing)
        running = not missing and demo_in_flight(key)
        if running:
            st.caption("This demo's models are queued or training: it is followed below.")
        if st.button(f"Run the {demo.title.lower()} demo", key=f"demo_{key}", type="primary",
                     disabled=bool(missing) or running):
            start_demo(key)
if DEMO_KEY in st.session_state:
    demo_view(*st.session_state[DEMO_KEY])
