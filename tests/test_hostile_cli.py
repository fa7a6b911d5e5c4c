"""Careless and hostile use of the CLI and the dashboard's edges (issue 18): outputs and the
executor checked before any work, no torch for `ufm runs`, sizes refused before a run is recorded,
rejected uploads leave nothing behind, Streamlit's metrics silenced, the upload limit stated once."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ufm.cli import main
from ufm.limits import MAX_ONNX_BYTES, MAX_UPLOAD_MB
from ufm.runs.store import Store

from dashboard.testing import CHROMIUM, free_port as _free_port
from .test_store import _cli_args

ROOT = Path(__file__).resolve().parents[1]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_reproduce_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    home = tmp_path / "home"
    t0 = time.perf_counter()
    assert main(["reproduce", "table1", "--out", str(a_file), "--home", str(home)]) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert main(["reproduce", "table1", "--out", str(a_file / "sub"), "--home", str(home)]) == 2
    assert "is a file, so the folder" in _one_line(capsys)
    assert time.perf_counter() - t0 < 5 and not home.exists()  # no store opened, nothing trained
    assert main(["sweep-canaries", "--out", str(a_file), "--home", str(home)]) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert main(["explain", "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert main(["influence", "--out", str(tmp_path)]) == 2  # a folder where a CSV file goes
    assert "is a folder" in _one_line(capsys)
    assert not home.exists()


def test_an_unreachable_ray_address_is_one_line_before_any_work(tmp_path, capsys):
    pytest.importorskip("ray")
    port = _free_port()  # nothing listens there
    t0 = time.perf_counter()
    assert main(["reproduce", "table1", "--executor", "ray", "--ray-address", f"ray://127.0.0.1:{port}",
                 "--out", str(tmp_path / "out"), "--home", str(tmp_path / "home")]) == 2
    line = _one_line(capsys)
    assert f"nothing answers at 127.0.0.1:{port}" in line and "ray start --head" in line
    assert time.perf_counter() - t0 < 20  # was a ConnectionError traceback after 33 s
    assert not (tmp_path / "out").exists()
    from ufm.runs.executors import check_ray_address
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        check_ray_address("head-node")
    check_ray_address("auto")  # left to Ray


def test_runs_verbs_do_not_import_torch(tiny_data, tmp_path, capsys, one_torch_thread):
    """On a home with a finished, a queued, a running and a failed run (an empty home was not enough:
    describing a run's canaries and looking for its bank loaded torch), and a complete bank of
    another setting (its key was worked out by the config class, which loads torch)."""
    import dataclasses

    from ufm.core.experiment import run_experiment
    from ufm.measure.bank import DEFAULT_REFERENCES, bank_configs
    from ufm.runs.store import BACKGROUND

    from .conftest import tiny_config

    home = tmp_path / "h"
    assert main(_cli_args(tiny_data, home, "--epochs", "2", "--quiet")) == 0
    with Store(home) as s:
        done = s.list_runs()[0].id
    bank = bank_configs(tiny_config(tiny_data, epochs=1), DEFAULT_REFERENCES)
    clean = run_experiment(bank[0])  # recorded as every reference model: the bank is only counted here
    with Store(home) as s:
        for c in bank:
            ref = s.add_result(dataclasses.replace(clean, config=c))
        queued = s.create_run(tiny_config(tiny_data, seed=1), status="queued")
        # a reference model queued for it: `runs cancel` looks for the bank's other users
        s.create_run(bank_configs(tiny_config(tiny_data, seed=1), DEFAULT_REFERENCES)[0], status="queued",
                     priority=BACKGROUND)
        running = s.create_run(tiny_config(tiny_data, seed=2), status="running")
        failed = s.create_run(tiny_config(tiny_data, seed=3), status="running")
        s.mark_failed(failed, "probe")
    code = ("import sys\nfrom ufm.cli import main\nrc = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'ray', 'streamlit', 'scipy') if m in sys.modules)\n"
            "print('HEAVY', heavy, rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for verb in (["runs", "list"], ["runs", "list", "--csv"], ["runs", "list", "--json"], ["runs", "list", "--all"],
                 ["runs", "show", done], ["runs", "show", ref], ["runs", "show", queued], ["runs", "cancel", queued], ["runs", "cancel", running],
                 ["runs", "delete", failed, "--force"], ["runs", "cancel", "abc"], ["studies", "list"],
                 ["designs", "list"]):
        r = subprocess.run([sys.executable, "-c", code, *verb, "--home", str(home)], capture_output=True, text=True,
                           env=env, timeout=60)
        assert "HEAVY [] " in r.stdout, (verb, r.stdout, r.stderr)


def test_a_refused_ood_size_leaves_no_run_record(tiny_data, tmp_path, capsys, one_torch_thread):
    home = tmp_path / "home"
    args = _cli_args(tiny_data, home, "--epochs", "1")
    args[args.index("--ood-size") + 1] = "100"  # the tiny OOD set has 60 test images
    assert main(args) == 2
    assert "asked for 100 inference images" in _one_line(capsys)
    with Store(home) as s:
        assert s.list_runs() == []


def test_privacy_audit_refuses_a_train_size_beyond_the_data(tiny_data, tmp_path, capsys):
    assert main(["privacy-audit", "--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]),
                 "--ood-size", "30", "--train-size", "5000", "--canaries", "6", "--device", "cpu",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "--train-size 5000 is more than the 300 training images" in _one_line(capsys)
    assert not (tmp_path / "p.json").exists()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("data, match", [
    (b"not a zip", "is not a readable .npz"),
    (_npz(y=np.zeros(3)), "has no array x"),
    (_npy(np.zeros((4, 8, 8), np.uint8)), "a single .npy array"),
    (_npz(x=np.zeros((4, 8, 8))), "must be uint8"),
    (_npz(x=np.zeros((4, 8, 8, 5), np.uint8)), "5-channel"),
])
def test_a_rejected_image_upload_leaves_nothing_and_names_no_server_path(data, match, tmp_path):
    from dashboard.audit_ui import accept_images
    from ufm.core.data import DataUnavailable

    home = tmp_path / "secret-home"
    with pytest.raises(DataUnavailable, match=match) as e:
        accept_images("mine.npz", data, home, (1, 8, 8))
    assert "mine.npz" in str(e.value) and str(tmp_path) not in str(e.value)
    assert not (home / "audits" / "images").exists() or not any((home / "audits" / "images").iterdir())
    kept = accept_images("ok.npz", _npz(x=np.zeros((4, 8, 8), np.uint8)), home, (1, 8, 8))
    assert kept.is_file() and oct(kept.stat().st_mode & 0o777) == "0o600"


def test_streamlit_metrics_are_silenced(monkeypatch):
    """Streamlit 1.67 serves /_stcore/metrics before any sign-in with no setting to turn it off;
    the dashboard drops its providers, so it answers with nothing."""
    from streamlit.runtime import Runtime
    from streamlit.runtime.stats import StatsManager

    from dashboard import access

    class Provider:
        stats_families = ["active_sessions"]

        def get_stats(self, family_names=None):
            return {"active_sessions": ["3 sessions"]}

    mgr = StatsManager()
    mgr.register_provider(Provider())
    assert mgr.get_stats() != {}
    monkeypatch.setattr(Runtime, "exists", classmethod(lambda cls: True))
    monkeypatch.setattr(Runtime, "instance", classmethod(lambda cls: type("R", (), {"stats_mgr": mgr})()))
    assert access.silence_metrics() is True
    assert dict(mgr.get_stats()) == {}


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_metrics_endpoint_says_nothing_once_a_page_has_loaded(server):
    """End to end: a real server's /_stcore/metrics after one visitor's page load (no sign-in
    needed for either) answers with no metric family at all."""
    from urllib.request import urlopen

    before = urlopen(server + "/_stcore/metrics", timeout=10).read().decode()
    assert "active_sessions 0" in before  # a fresh server: nothing to show yet
    from dashboard.testing import chromium

    with chromium() as browser:  # wait for the page itself: a fixed browser budget ended before the
        pg = browser.new_page()  # script ran on a loaded CI machine, and then nothing was silenced
        pg.goto(server)
        pg.get_by_text("Guided demos").first.wait_for(timeout=120_000)
    assert urlopen(server + "/_stcore/metrics", timeout=10).read().decode().strip() == "# EOF"


def test_readme_and_config_state_the_enforced_limits():
    import tomllib

    from ufm.limits import MAX_AUDIT_IMAGE_BYTES, MAX_BATCH_BYTES, MAX_INPUT_SIDE

    conf = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert conf["server"]["maxUploadSize"] == MAX_UPLOAD_MB
    readme = (ROOT / "README.md").read_text()
    running = readme.split("## Running it for others", 1)[1].split("\n## ", 1)[0]
    audit = readme.split("## Auditing a model you did not train", 1)[1].split("\n## ", 1)[0]
    for text in (running, audit):
        assert f"{MAX_UPLOAD_MB} MB" in text and f"{MAX_ONNX_BYTES // 2**20} MB" in text
    for figure in (f"{MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}", f"{MAX_BATCH_BYTES // 2**20} MB",
                   f"{MAX_AUDIT_IMAGE_BYTES // 2**30} GB"):
        assert figure in audit, figure
    assert re.search(r"/_stcore/metrics", running) and "0700" in running and "designs forget" in running


@pytest.fixture
def alarm():
    """A hang (a pipe opened for reading) or an endless read (/dev/zero) fails the test in 20 s."""
    import signal

    def stop(*_):
        raise TimeoutError("hung reading a device or pipe")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_a_device_or_pipe_given_as_a_file_is_refused_without_reading_it(kind, tmp_path, capsys, alarm):
    """Probe: `ufm audit --model /dev/zero` read until the machine ran out of memory (11.8 GB at 60 s;
    a device reports size 0), `--classes /dev/zero` the same, and a named pipe as --model,
    --feature or --classes blocked forever. Only regular files are read, never more than the limit."""
    from ufm.audits.onnx_input import OnnxModelError, read_model_bytes
    from ufm.imageio import ImageError, open_image

    path = Path(kind)
    if kind == "fifo":
        path = tmp_path / "model.onnx"
        os.mkfifo(path)
    with pytest.raises(OnnxModelError, match="not a regular file"):
        read_model_bytes(path)
    with pytest.raises(ImageError, match="not a regular file"):
        open_image(path)
    rc = main(["audit", "--model", str(path), "--ood", str(tmp_path / "x.npz"), "--home", str(tmp_path / "h")])
    assert rc == 2 and "not a regular file" in _one_line(capsys)
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "m.onnx").write_bytes(_pool_onnx())
    rc = main(["audit", "--model", str(tmp_path / "m.onnx"), "--ood", str(tmp_path / "x.npz"), "--ood-size", "2",
               "--classes", str(path), "--home", str(tmp_path / "h")])
    line = _one_line(capsys)
    assert rc == 2 and "--classes" in line and "not a regular file" in line


def _pool_onnx() -> bytes:
    from onnx import TensorProto, helper as oh

    g = oh.make_graph([oh.make_node("GlobalAveragePool", ["x"], ["p"]), oh.make_node("Flatten", ["p"], ["y"])], "g",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()


def test_read_bounded_never_reads_past_the_limit(tmp_path):
    from ufm.fileio import read_bounded

    (tmp_path / "a").write_bytes(b"12345")
    assert read_bounded(tmp_path / "a", 5) == b"12345" and read_bounded(tmp_path / "a", 4) is None
    with pytest.raises(IsADirectoryError):
        read_bounded(tmp_path, 5)
