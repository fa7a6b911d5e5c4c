"""Who may use the dashboard: an optional password, required once it is served beyond this machine.

The password comes from ``$UFM_PASSWORD`` or ``ufm_password`` in ``.streamlit/secrets.toml``. With
one set, every page shows only a sign-in form until it is given in this browser session (a session
cookie keeps the sign-in across reloads and links until the browser closes). Without one, the
dashboard runs only when Streamlit listens on a loopback address (the default of
``.streamlit/config.toml``); bound wider, every page refuses and says how to set a password.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time

import streamlit as st

PASSWORD_ENV = "UFM_PASSWORD"
SECRET_KEY = "ufm_password"
AUTH_KEY = "_ufm_signed_in"  # session state: the fingerprint of the password this session gave
WRONG_PASSWORD_DELAY = 1.0  # seconds; slows guessing down without bothering a person who mistyped

log = logging.getLogger("ufm.dashboard")


def server_log() -> logging.Logger:
    """The dashboard's logger, writing to the server's stderr with a time stamp (set up once per process)."""
    parent = logging.getLogger("ufm")
    if not parent.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        parent.addHandler(handler)
        parent.setLevel(logging.INFO)
    return log


def configured_password() -> str | None:
    """``$UFM_PASSWORD``, else ``ufm_password`` from Streamlit's secrets, else None (no password)."""
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env
    if st.secrets.load_if_toml_exists():  # False (not an exception) when there is no secrets file
        value = st.secrets.get(SECRET_KEY)
        if value:
            return str(value)
    return None


def is_local_address(address: str | None) -> bool:
    """True for a loopback bind address. Unset or empty means every interface (Streamlit's default)."""
    if not address or not address.strip():
        return False
    a = address.strip().strip("[]").lower()
    if a == "localhost":
        return True
    try:
        return ipaddress.ip_address(a).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def _fingerprint(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def signed_in(password: str) -> bool:
    """Whether this session gave ``password`` (a changed password signs every session out)."""
    given = st.session_state.get(AUTH_KEY)
    return isinstance(given, str) and hmac.compare_digest(given, _fingerprint(password))


def silence_metrics() -> bool:
    """Empty Streamlit's ``/_stcore/metrics``; True when it is silent.

    Streamlit serves that endpoint to anyone who reaches the server, before any sign-in, and has
    no setting to turn it off (1.67): it shows the number of sessions, session events and the
    names and entry counts of the cached functions. ufm uses none of it, so the stats providers
    are dropped (once per server; the first script run of any visitor does it, and before that
    there is nothing to show). Streamlit keeps them in a private attribute: if a new Streamlit
    moves it, this logs a warning and ``tests/test_hostile_cli.py`` fails.
    """
    from streamlit.runtime import Runtime

    if not Runtime.exists():
        return False  # no server (AppTest): no endpoint either
    try:
        providers = Runtime.instance().stats_mgr._providers_by_family
    except AttributeError as e:  # a Streamlit that keeps them elsewhere
        log.warning("could not silence /_stcore/metrics (%s): it shows session counts and cache names to anyone "
                    "who reaches the server", e)
        return False
    providers.clear()
    return True


# A sign-in lasts for the browser session: a reload or a link opened in the same browser starts a
# new Streamlit session, which used to ask for the password again on every page load. The browser
# keeps a session cookie (gone when it closes) holding "<issued>.<mac>": the mac binds the issue
# time to the password (a changed password signs everyone out) under a key that lives only in this
# server process (a restart signs everyone out) and never leaves it, so the cookie reveals nothing
# about the password and cannot be forged. It also expires after SESSION_SECONDS.
AUTH_COOKIE = "ufm_auth"
SESSION_SECONDS = 12 * 3600
_SERVER_KEY = secrets.token_bytes(32)
_TOKEN = "_ufm_auth_token"      # session state: the token this session's sign-in issued
_SIGNED_OUT = "_ufm_signed_out"  # session state: signed out here; ignore the cookie sent at connect time


def session_token(password: str, now: float | None = None) -> str:
    """A sign-in token for this browser session (see the comment above)."""
    issued = str(int(time.time() if now is None else now))
    return f"{issued}.{_mac(issued, password)}"


def session_token_ok(token: str | None, password: str, now: float | None = None) -> bool:
    """Whether ``token`` was issued by this server process for ``password`` less than
    :data:`SESSION_SECONDS` ago."""
    if not token or "." not in token:
        return False
    issued, mac = token.split(".", 1)
    if not issued.isdigit() or not hmac.compare_digest(mac, _mac(issued, password)):
        return False
    age = (time.time() if now is None else now) - int(issued)
    return 0 <= age < SESSION_SECONDS


def _mac(issued: str, password: str) -> str:
    return hmac.new(_SERVER_KEY, f"{issued}.{_fingerprint(password)}".encode(), hashlib.sha256).hexdigest()


def gate() -> bool:
    """Show the sign-in form or the refusal when needed; True when this session may see the pages.

    Call before ``st.navigation(...).run()`` and stop the script when it returns False, so no page
    code runs for a visitor who has not signed in.
    """
    silence_metrics()
    password = configured_password()
    if password is None:
        address = st.get_option("server.address")
        if is_local_address(address):
            return True
        where = f"on {address}" if address else "on every network address"
        st.title("Password required")
        st.error(f"This dashboard is served {where}, so anyone who can reach it could see, delete and start "
                 "runs, and it has no password. Set one and restart: `UFM_PASSWORD=... streamlit run app.py "
                 "--server.address ...`, or put `ufm_password = \"...\"` in `.streamlit/secrets.toml`. Or "
                 "serve it on this machine only: `streamlit run app.py` (localhost).")
        return False
    ss = st.session_state
    cookie = browser_cookie(AUTH_COOKIE)
    if not signed_in(password) and not ss.get(_SIGNED_OUT) and session_token_ok(cookie, password):
        ss[AUTH_KEY] = _fingerprint(password)  # signed in earlier in this browser session (a reload, a link)
        ss[_TOKEN] = cookie
    if signed_in(password):
        # after the sign-in's rerun, so the script that sets the cookie reaches the browser (once)
        set_browser_cookie(AUTH_COOKIE, ss.setdefault(_TOKEN, session_token(password)))
        if st.sidebar.button("Sign out", key="ufm_sign_out"):
            del ss[AUTH_KEY]
            ss.pop(_TOKEN, None)
            ss[_SIGNED_OUT] = True  # this session's cookie header still carries the token: ignore it
            st.rerun()
        return True
    if ss.get(_SIGNED_OUT):
        set_browser_cookie(AUTH_COOKIE, None)
    st.title("Sign in")
    with st.form("ufm_login"):
        given = st.text_input("password", type="password", key="ufm_password_input")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        if hmac.compare_digest(given.encode(), password.encode()):
            st.session_state[AUTH_KEY] = _fingerprint(password)
            st.session_state[_TOKEN] = session_token(password)
            st.session_state.pop(_SIGNED_OUT, None)
            del st.session_state["ufm_password_input"]  # keep no plain copy in the session
            st.rerun()
        server_log().warning("wrong dashboard password")
        time.sleep(WRONG_PASSWORD_DELAY)
        st.error("Wrong password.")
    return False


# ------------------------------------------------------------------ browser-session cookies

_COOKIE_VALUE = re.compile(r"[0-9A-Za-z._-]{1,200}")
_COOKIES_SET = "_ufm_cookies_set"  # session state: {name: value} already sent to this browser


def browser_cookie(name: str) -> str | None:
    """The value of cookie ``name`` that the browser sent when this session connected, or None
    (no cookie, a malformed value, or no browser: tests, bare mode)."""
    try:
        value = st.context.cookies.get(name)
    except Exception:  # no client context (AppTest, bare mode): no cookies
        return None
    return value if isinstance(value, str) and _COOKIE_VALUE.fullmatch(value) else None


def set_browser_cookie(name: str, value: str | None) -> None:
    """Ask the browser to keep ``name=value`` until it closes (a session cookie: no expiry date),
    for this site only (``SameSite=Strict``); None deletes it. Sent once per value and session.

    Streamlit has no server-side way to set a cookie, so a one-line script does (Streamlit runs it
    only because ``unsafe_allow_javascript`` is set; the value is checked against a strict pattern,
    so nothing from a user reaches the script).

    Raises:
        ValueError: ``name`` or ``value`` has characters a cookie must not carry.
    """
    if not _COOKIE_VALUE.fullmatch(name) or (value is not None and not _COOKIE_VALUE.fullmatch(value)):
        raise ValueError("cookie names and values are letters, digits, '.', '_' and '-' only")
    sent = st.session_state.setdefault(_COOKIES_SET, {})
    if sent.get(name, "") == value:
        return
    sent[name] = value
    secure = "; Secure" if _https() else ""
    cookie = (f"{name}={value}; path=/; SameSite=Strict{secure}" if value is not None
              else f"{name}=; path=/; max-age=0; SameSite=Strict{secure}")
    st.html(f"<script>document.cookie = {cookie!r};</script>", unsafe_allow_javascript=True)


def _https() -> bool:
    try:
        return str(st.context.url or "").startswith("https:")
    except Exception:
        return False


STARTED_KEY = "_ufm_started_runs"  # session state: ids of the runs this session submitted


def mark_started(*run_ids: str) -> None:
    """Remember that this session submitted these runs (it may cancel them without confirming)."""
    st.session_state.setdefault(STARTED_KEY, set()).update(run_ids)


def started_here(run_id: str) -> bool:
    return run_id in st.session_state.get(STARTED_KEY, ())


def confirm_button(label: str, key: str, *, target: str, prompt: str, needed: bool = True,
                   disabled: bool = False, where=None) -> bool:
    """A button for a destructive action on ``target``; True once the action should happen.

    With ``needed``, a click only asks: a warning with "Confirm" (key ``{key}_yes``) and "Keep"
    (key ``{key}_no``) buttons appears below, and the action happens on "Confirm". The pending
    question remembers its ``target``, so picking another run meanwhile does not confirm that one.
    ``where``: the container of the first button (default: the current one).
    """
    flag = f"_confirm_{key}"
    if (where or st).button(label, key=key, disabled=disabled):
        if not needed:
            return True
        st.session_state[flag] = target
    if st.session_state.get(flag) != target or disabled:
        st.session_state.pop(flag, None)
        return False
    st.warning(prompt)
    yes, no = st.columns(2)
    if yes.button(f"Confirm: {label.lower()}", key=f"{key}_yes", type="primary"):
        st.session_state.pop(flag, None)
        return True
    if no.button("Keep it", key=f"{key}_no"):
        st.session_state.pop(flag, None)
        st.rerun()
    return False
