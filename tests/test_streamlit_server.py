"""The dashboard test server (dashboard/testing.py) says why it did not start instead of timing out
silently: a server that exits, and one that never answers, both raise with the end of their log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from dashboard.testing import ServerDidNotStart, free_port, streamlit_server, wait_healthy


def test_a_server_that_exits_raises_with_its_log_tail(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('\\n'.join(f'line {i}' for i in range(100)));"
                                 "print('port already in use'); raise SystemExit(3)"], stdout=out,
                                stderr=subprocess.STDOUT)
        proc.wait()
    with pytest.raises(ServerDidNotStart, match=r"exited with status 3") as info:
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, log, timeout=30)
    assert str(info.value).endswith("line 99\nport already in use") and "line 59\n" not in str(info.value)


def test_a_server_that_never_answers_raises_after_the_timeout(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("still importing torch\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerDidNotStart, match=r"did not answer .* within 2 s(.|\n)*still importing torch"):
            wait_healthy(f"http://127.0.0.1:{free_port()}", proc, log, timeout=2)
        assert 2 <= time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


def test_streamlit_server_raises_when_streamlit_cannot_start(tmp_path):
    # a bad config value makes `streamlit run` exit at once: the error reaches the caller, with the log
    with pytest.raises(ServerDidNotStart, match=r"exited with status") as info:
        with streamlit_server(tmp_path, {"STREAMLIT_SERVER_MAX_UPLOAD_SIZE": "not-a-number"}, timeout=60):
            pass
    assert "streamlit.log" in str(info.value) and "not a valid integer" in str(info.value)


def test_streamlit_server_serves_then_stops(tmp_path):
    app = tmp_path / "tiny_app.py"
    app.write_text("import streamlit as st\nst.write('hello')\n")
    with streamlit_server(tmp_path / "home", {"UFM_PASSWORD": None}, app=app) as server:
        assert urllib.request.urlopen(server.url + "/_stcore/health", timeout=10).read() == b"ok"
        assert server.log == tmp_path / "home" / "streamlit.log"
    with pytest.raises(OSError):  # stopped: nothing listens any more
        urllib.request.urlopen(server.url + "/_stcore/health", timeout=5)
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
