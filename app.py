"""ufm dashboard: `streamlit run app.py`."""

import streamlit as st

st.set_page_config(page_title="ufm: unique feature memorisation", page_icon=":material/fingerprint:", layout="wide")

pages = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/feature.py", title="Feature", icon=":material/draw:"),
    st.Page("app_pages/train.py", title="Train & measure", icon=":material/model_training:"),
    st.Page("app_pages/influence.py", title="Influence", icon=":material/scatter_plot:"),
    st.Page("app_pages/explain.py", title="Explain", icon=":material/visibility:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/history:"),
]
st.navigation(pages).run()
