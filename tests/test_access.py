"""The dashboard is private by default: Streamlit's config, the password gate, allowed data roots."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest
import streamlit as st
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from ufm.paths import PathNotAllowed, allowed_roots, check_user_path, is_allowed

ROOT = Path(__file__).resolve().parents[1]
HOME_TITLE = "Does the network remember what it saw once?"


# ---------------------------------------------------------------- .streamlit/config.toml
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_streamlit_config_is_private_and_quiet():
    conf = _flat(tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text()))
    assert conf["server.address"] == "localhost"
    assert conf["browser.gatherUsageStats"] is False
    assert conf["client.showErrorDetails"] == "none"
    assert conf["server.fileWatcherType"] == "none"
    assert conf["runner.postScriptGC"] is False
    assert conf["client.toolbarMode"] == "minimal" and conf["ui.hideTopBar"] is True  # no Deploy, no Stop
    from ufm.limits import MAX_ONNX_BYTES, MAX_UPLOAD_MB
    assert conf["server.maxUploadSize"] == MAX_UPLOAD_MB <= MAX_ONNX_BYTES / 2**20  # the page says the same (issue 18)
    assert conf["server.enableXsrfProtection"] is True and conf["server.enableAgentApi"] is False
    # every key is one Streamlit knows (a typo would be ignored silently) ...
    known = st_config.get_config_options()
    assert set(conf) - set(known) == set()
    # ... and the enumerated values are ones this version accepts
    assert conf["client.showErrorDetails"] in {o.value for o in st_config.ShowErrorDetailsConfigOptions}
    assert conf["client.toolbarMode"] in {"auto", "developer", "viewer", "minimal"}
    assert conf["server.fileWatcherType"] in {"auto", "watchdog", "poll", "none"}


def test_no_pages_folder_next_to_app():
    """Streamlit serves pages/<name>.py directly at /<name> without running app.py (and its gate)."""
    assert (ROOT / "app.py").is_file() and (ROOT / "app_pages" / "home.py").is_file()
    assert not (ROOT / "pages").exists()


# ---------------------------------------------------------------- allowed data roots
@pytest.fixture
def roots(tmp_path, monkeypatch):
    data, extra, outside = tmp_path / "data", tmp_path / "extra", tmp_path / "secret"
    for d in (data / "mine", extra, outside):
        d.mkdir(parents=True)
    (data.parent / "data2").mkdir()
    monkeypatch.setenv("UFM_DATA_DIR", str(data))
    monkeypatch.setenv("UFM_ALLOWED_DATA", os.pathsep.join([str(extra), "", str(data)]))
    return dict(data=data.resolve(), extra=extra.resolve(), outside=outside.resolve(), tmp=tmp_path.resolve())


def test_allowed_roots_are_data_dir_and_operator_list(roots):
    assert allowed_roots() == [roots["data"], roots["extra"]]  # resolved, empty entries and duplicates dropped


def test_paths_inside_roots_are_accepted_and_resolved(roots):
    assert check_user_path(str(roots["data"] / "mine")) == roots["data"] / "mine"
    assert check_user_path(f"  {roots['extra']}  ") == roots["extra"]
    assert check_user_path("mine") == roots["data"] / "mine"  # relative: to the data folder, not the cwd
    assert check_user_path(str(roots["data"] / "mine" / ".." / "mine")) == roots["data"] / "mine"
    assert check_user_path(str(roots["data"] / "not-yet")) == roots["data"] / "not-yet"


def test_dot_dot_symlink_and_prefix_tricks_are_refused(roots):
    data = roots["data"]
    (data / "link").symlink_to(roots["outside"], target_is_directory=True)
    tricks = [str(data / ".." / "secret"), "../secret", str(data / "link"), str(data / "link" / "x.npz"),
              str(roots["tmp"] / "data2"), "/", "~", "/etc"]
    for t in tricks:
        with pytest.raises(PathNotAllowed, match="outside the allowed data folders; ask the operator to add it "
                                                 "to UFM_ALLOWED_DATA"):
            check_user_path(t)
    assert not is_allowed(roots["tmp"] / "data2", [data])
    assert is_allowed(data / "a", [data]) and is_allowed(data, [data])


def test_refusal_does_not_reveal_existence(roots):
    def message(p: Path) -> str:
        with pytest.raises(PathNotAllowed) as e:
            check_user_path(str(p))
        return str(e.value).replace(str(p), "<p>")

    assert message(roots["outside"]) == message(roots["tmp"] / "no-such-folder")
    loop = roots["tmp"] / "loop"
    loop.symlink_to(loop)
    assert message(loop) == message(roots["outside"])
    with pytest.raises(PathNotAllowed, match="empty"):
        check_user_path("   ")
    with pytest.raises(ValueError):  # PathNotAllowed is a ValueError: pages catch it with the other input errors
        check_user_path("a\0b")


# ---------------------------------------------------------------- the password gate
def test_is_local_address():
    from dashboard.access import is_local_address

    for a in ("localhost", "127.0.0.1", "127.0.1.1", "::1", "[::1]", " LOCALHOST "):
        assert is_local_address(a), a
    for a in (None, "", "0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_local_address(a), a


@pytest.fixture
def app_home(tmp_path, monkeypatch):
    monkeypatch.setenv("UFM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UFM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UFM_PASSWORD", raising=False)
    monkeypatch.setattr("dashboard.access.WRONG_PASSWORD_DELAY", 0.0)
    old = st_config.get_option("server.address")
    st_config.set_option("server.address", "localhost")
    st.cache_data.clear()
    yield tmp_path
    st_config.set_option("server.address", old)


def _titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def test_localhost_without_password_shows_the_pages(app_home):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception and _titles(at) == [HOME_TITLE]
    assert not [b for b in at.button if b.key == "ufm_sign_out"]


@pytest.mark.parametrize("address", ["0.0.0.0", None])
def test_served_beyond_localhost_without_password_refuses(app_home, address):
    st_config.set_option("server.address", address)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception and _titles(at) == ["Password required"]
    assert any("UFM_PASSWORD" in e.value and "secrets.toml" in e.value for e in at.error)
    at.switch_page("app_pages/runs.py").run()
    assert _titles(at) == ["Password required"]


def test_password_shows_only_the_sign_in_until_given(app_home, monkeypatch, caplog):
    monkeypatch.setenv("UFM_PASSWORD", "correct horse")
    st_config.set_option("server.address", "0.0.0.0")  # a password makes serving wider fine
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception and _titles(at) == ["Sign in"] and len(at.text_input) == 1
    for page in ("train", "runs", "compare"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert _titles(at) == ["Sign in"] and not at.selectbox, page
    at.text_input(key="ufm_password_input").input("wrong horse")
    at.button(key="FormSubmitter:ufm_login-Sign in").click().run()
    assert [e.value for e in at.error] == ["Wrong password."] and _titles(at) == ["Sign in"]
    assert all("correct horse" not in m.value for m in [*at.markdown, *at.error, *at.caption])
    at.text_input(key="ufm_password_input").input("correct horse")
    at.button(key="FormSubmitter:ufm_login-Sign in").click().run()
    assert not at.exception and _titles(at) == ["Compare regularisers side by side"]  # the page asked for
    assert not at.error
    assert "correct horse" not in repr(at.session_state)
    at.button(key="ufm_sign_out").click().run()
    assert _titles(at) == ["Sign in"]


def test_password_from_streamlit_secrets(app_home):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.secrets["ufm_password"] = "s3cret"
    at.run()
    assert _titles(at) == ["Sign in"]
    at.text_input(key="ufm_password_input").input("s3cret")
    at.button(key="FormSubmitter:ufm_login-Sign in").click().run()
    assert _titles(at) == [HOME_TITLE]


def test_unexpected_error_is_logged_not_shown(app_home, monkeypatch, caplog):
    def broken():
        raise RuntimeError("internal detail /srv/secret.db")

    monkeypatch.setattr("ufm.core.train.describe_device", broken)
    with caplog.at_level(logging.ERROR, logger="ufm.dashboard"):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["Something went wrong; the details are in the server log."]
    assert "internal detail" in caplog.text and "Traceback" in caplog.text


def test_sign_in_is_kept_for_the_browser_session(app_home, monkeypatch):
    from dashboard import access

    monkeypatch.setenv("UFM_PASSWORD", "correct horse")
    st_config.set_option("server.address", "0.0.0.0")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.text_input(key="ufm_password_input").input("correct horse")
    at.button(key="FormSubmitter:ufm_login-Sign in").click().run()
    assert _titles(at) == [HOME_TITLE]
    token = at.session_state["_ufm_cookies_set"][access.AUTH_COOKIE]  # sent to the browser once signed in
    assert access.session_token_ok(token, "correct horse") and "correct horse" not in token
    # a reload or a link is a new session; the browser sends the cookie back: no second sign-in
    monkeypatch.setattr(access, "browser_cookie", lambda name: token if name == access.AUTH_COOKIE else None)
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not again.exception and _titles(again) == [HOME_TITLE]
    again.switch_page("app_pages/runs.py").run()
    assert _titles(again) != ["Sign in"]
    # signing out ignores the cookie this session connected with, and asks the browser to drop it
    again.button(key="ufm_sign_out").click().run()
    assert _titles(again) == ["Sign in"] and again.session_state["_ufm_cookies_set"][access.AUTH_COOKIE] is None
    # a forged, expired or other-password token is refused
    for bad in ("123.abc", token.split(".")[0] + ".0", access.session_token("correct horse", now=0),
                access.session_token("other password")):
        assert not access.session_token_ok(bad, "correct horse")
        monkeypatch.setattr(access, "browser_cookie", lambda name, bad=bad: bad)
        assert _titles(AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()) == ["Sign in"]
