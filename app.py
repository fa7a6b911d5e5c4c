"""ufm dashboard: `streamlit run app.py` (private to this machine by default; see .streamlit/config.toml)."""

import streamlit as st

from dashboard import access


def main() -> None:
    st.set_page_config(page_title="ufm: unique feature memorisation", page_icon=":material/fingerprint:",
                       layout="wide")

    allowed = access.gate()  # the sign-in form or the refusal when not
    pages = [
        st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("app_pages/feature.py", title="Feature", icon=":material/draw:"),
        st.Page("app_pages/train.py", title="Train & measure", icon=":material/model_training:"),
        st.Page("app_pages/influence.py", title="Influence", icon=":material/scatter_plot:"),
        st.Page("app_pages/explain.py", title="Explain", icon=":material/visibility:"),
        st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
        st.Page("app_pages/privacy.py", title="Audit privacy", icon=":material/shield:"),
        st.Page("app_pages/runs.py", title="Runs", icon=":material/history:"),
        st.Page("app_pages/audit.py", title="Audit a model", icon=":material/policy:"),
    ]
    # Resolved even when locked (hidden, not run), so the page asked for in the URL opens after sign-in.
    page = st.navigation(pages, position="sidebar" if allowed else "hidden")
    if not allowed:
        st.stop()  # no page code runs before sign-in
    try:
        page.run()
    except Exception:  # st.stop / st.rerun / st.switch_page are BaseExceptions and pass through
        # Known user errors are caught on the pages with their own messages; anything reaching here is
        # a bug or an environment problem whose traceback (paths, ids) belongs in the server log only.
        access.server_log().exception("page %r failed", page.title)
        st.error("Something went wrong; the details are in the server log.")


# Streamlit runs this script as "__main__" (and registers it as sys.modules["__main__"]), so every
# run or task process that multiprocessing starts from the server re-executes it as "__mp_main__"
# while preparing the child. Unguarded, each child ran the whole dashboard in bare mode (the gate,
# the navigation and the Home page): 12 "missing ScriptRunContext" warnings per process in the
# server log, about 1,450 in a 45-minute session with reference banks.
if __name__ == "__main__":
    main()
