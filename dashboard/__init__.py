"""UI-side helpers for the Streamlit dashboard (app.py, app_pages/). The science lives in ufm/."""
