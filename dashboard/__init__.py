"""UI-side helpers for the Streamlit dashboard (app.py, pages/). The science lives in ufm/."""
