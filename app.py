"""ufm dashboard: `streamlit run app.py`."""

import streamlit as st

st.set_page_config(page_title="ufm: unique feature memorisation", page_icon=":material/fingerprint:", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/feature.py", title="Feature", icon=":material/draw:"),
    st.Page("pages/train.py", title="Train & measure", icon=":material/model_training:"),
    st.Page("pages/influence.py", title="Influence", icon=":material/scatter_plot:"),
    st.Page("pages/explain.py", title="Explain", icon=":material/visibility:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/history:"),
]
st.navigation(pages).run()
