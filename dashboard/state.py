"""Everything the pages share: cached resources, session-state keys, the current setup.

All Streamlit caching decorators live here (STYLE habit 4). Results themselves live in the run
store, so they survive page switches, reloads and restarts; session state only remembers what
the user is looking at (and the feature being designed).

The current feature and setup (dataset, model, canary, ...) have one source of truth each:
:func:`current_feature` / :func:`current_setup`, changed only through :func:`set_feature` /
:func:`set_setup`. Every widget that sets them (Feature page kinds, canvas, grid, upload; Train
page form, gallery, number box) goes through these. They survive page changes (session state)
and reloads: each change is saved, content-addressed, as ``<ufm home>/designs/<id>.json`` and
the id rides in the URL as ``?design=<id>`` (re-added on every page, since switching pages drops
query parameters). A reload, or the link sent to a colleague of the same server, restores both.
"""

from __future__ import annotations

import os
import json
import re
from dataclasses import asdict
from pathlib import Path

import streamlit as st

from ufm.core.canary import CanaryChoice
from ufm.core.data import BENCHMARKS, available_offline, default_data_dir, load_split
from ufm.core.designs import save_design
from ufm.core.experiment import ExperimentConfig
from ufm.core.features import Feature, glyph
from ufm.runs.executors import Executor, executor_from_env
from ufm.runs.jobs import Runner
from ufm.runs.store import Store
from ufm.core.train import DEFAULT_DP, DPConfig

# Session-state keys (one place, so pages cannot drift apart).
FEATURE = "feature"            # the Feature being designed
SETUP = "setup"                # dict of the Train page's choices (dataset, arch, ...)
RUN = "run_id"                 # the run the Train page shows
STUDY = "study_name"
DESIGN = "design"              # query parameter: the saved feature + setup (see the module docstring)
_DESIGN_ID = "_design_id"
_DESIGN_TRIED = "_design_restored"
DESIGN_COOKIE = "ufm_design"   # this browser's last design id (see _restore_design)

QUICK = dict(train_size=3000, epochs=30, patience=5, ood_size=500)
PAPER = dict(train_size=None, epochs=500, patience=10, ood_size=1000)


@st.cache_resource
def store() -> Store:
    """The run store under UFM_HOME, shared by all sessions of this server (thread-safe)."""
    return Store.open(os.environ.get("UFM_HOME"))


@st.cache_resource
def runner() -> Runner:
    """This server's local executor (:class:`ufm.runs.jobs.Runner`): one worker per device, a queue behind it."""
    return Runner(store())


def auto_references() -> bool:
    """Whether Start and the demos also queue the reference models for the calibrated verdict
    (default yes; ``UFM_AUTO_REFERENCES=0`` turns it off, e.g. on a shared machine or in tests)."""
    return os.environ.get("UFM_AUTO_REFERENCES", "1").strip() not in ("0", "false", "no", "")


@st.cache_resource
def executor() -> Executor:
    """Where Compare and Influence send their studies: a Ray cluster when ``$UFM_RAY_ADDRESS`` is
    set, else this server's :func:`runner`. Either way progress and results land in :func:`store`."""
    return executor_from_env(store(), runner())


def data_dir() -> str:
    return str(default_data_dir())


@st.cache_data(show_spinner=False)
def offline_datasets(root: str) -> list[str]:
    return available_offline(root)


@st.cache_data(show_spinner="Loading images ...", max_entries=6)
def images(dataset: str, split: str, root: str, limit: int | None = 200):
    """(x, y, classes) as numpy for galleries and previews; small by default."""
    d = load_split(dataset, split, data_dir=root, limit=limit)
    return d.x.numpy(), d.y.numpy(), d.classes


@st.cache_data(show_spinner="Loading images ...", max_entries=16)
def training_images(dataset: str, root: str, train_size: int | None, indices: tuple[int, ...]):
    """(x, y, classes) of the training images at ``indices`` as a run with ``train_size`` sees them
    (the stratified subset of :func:`ufm.core.experiment.training_split`), so that "image 10" in a gallery
    is the image a run's canary index 10 stamps. Indices past the set are left out.

    Raises:
        ValueError: the set holds one class, or ``train_size`` is below the number of classes.
    """
    if train_size is None:  # everything, in the official order: only read what is asked for
        d = load_split(dataset, "train", data_dir=root, limit=max(indices, default=0) + 1)
    else:
        d = load_split(dataset, "train", data_dir=root, limit=train_size, stratified=True)
    idx = [i for i in indices if 0 <= i < len(d)]
    return d.x[idx].numpy(), d.y[idx].numpy(), d.classes


@st.cache_data(show_spinner="Counting the training images ...", max_entries=32)
def training_set_size(dataset: str, root: str, train_size: int | None) -> int:
    """How many training images a run with ``train_size`` uses (fewer when the set is smaller); only
    the count is cached, not the images.

    Raises:
        DataUnavailable / ValueError: the dataset cannot be read (the message says what to do).
    """
    from ufm.core.experiment import ExperimentConfig
    from ufm.audits.privacy_audit import training_set_size as count

    return count(ExperimentConfig(dataset=dataset, data_dir=root, train_size=train_size))


@st.cache_data(show_spinner="Loading images ...", max_entries=16)
def gallery_indices(dataset: str, root: str, train_size: int | None, n: int, seed: int = 0) -> tuple[int, ...]:
    """``n`` training-image indices (as a run with ``train_size`` numbers them) spread over every class
    (:func:`ufm.core.data.spread_indices`), so a gallery of a class-sorted set is not all one class.

    Raises:
        DataUnavailable / ValueError: the dataset cannot be read (the message says what to do).
    """
    from ufm.core.sampling import spread_indices

    d = load_split(dataset, "train", data_dir=root, limit=train_size, stratified=train_size is not None)
    return tuple(int(i) for i in spread_indices(d.y.numpy(), n, seed=seed))


@st.cache_data(show_spinner="Counting the training images ...", max_entries=32)
def class_counts(dataset: str, root: str, train_size: int | None) -> tuple[tuple[str, int], ...]:
    """(class name, images) of the training images a run with ``train_size`` uses (training and
    validation together), in class order; only the counts are cached.

    Raises:
        DataUnavailable / ValueError: the dataset cannot be read (the message says what to do).
    """
    import numpy as np

    d = load_split(dataset, "train", data_dir=root, limit=train_size, stratified=train_size is not None)
    counts = np.bincount(d.y.numpy(), minlength=len(d.classes))
    return tuple((str(c), int(n)) for c, n in zip(d.classes, counts))


def class_counts_text(dataset: str, root: str, train_size: int | None) -> str:
    """"per class: normal 135, pneumonia 65" for a run's details; the reason when the set cannot be read."""
    from ufm.core.data import DataUnavailable

    try:
        counts = class_counts(dataset, root, train_size)
    except (DataUnavailable, ValueError, OSError) as e:
        return f"class counts unavailable ({e})"
    return "per class: " + ", ".join(f"{name} {n:,}" for name, n in counts)


def dataset_choices() -> list[str]:
    """Offline datasets first; the downloadable benchmarks after them."""
    offline = offline_datasets(data_dir())
    return offline + [d for d in BENCHMARKS if d not in offline and d != "chest-xray"]


def default_setup() -> dict:
    return dict(dataset=(dataset_choices() or ["mnist"])[0], arch="mlp", regularisers=[],
                canary=CanaryChoice("index", (0,)), seed=0, **QUICK)


def current_feature() -> Feature:
    """The feature every page uses (restored from ``?design=`` after a reload; the letter A at first)."""
    _restore_design()
    if FEATURE not in st.session_state:
        st.session_state[FEATURE] = glyph("A")
    _sync_url()
    return st.session_state[FEATURE]


def current_setup() -> dict:
    """The Train page's choices (dataset, arch, regularisers, canary, budget, ...), shared by all pages."""
    _restore_design()
    if SETUP not in st.session_state:
        st.session_state[SETUP] = default_setup()
    _sync_url()
    return st.session_state[SETUP]


def set_feature(feature: Feature) -> None:
    """Make ``feature`` the current feature (and save it for reloads)."""
    if not isinstance(feature, Feature):
        raise TypeError(f"set_feature needs a Feature, got {type(feature).__name__}")
    if st.session_state.get(FEATURE) != feature:
        st.session_state[FEATURE] = feature
        _save_design()


def set_setup(setup: dict) -> None:
    """Make ``setup`` the current setup (and save it for reloads)."""
    setup = dict(setup)
    if st.session_state.get(SETUP) != setup:
        st.session_state[SETUP] = setup
        _save_design()


def setup_to_dict(setup: dict) -> dict:
    """A setup as JSON-able data (canary and DP settings as dicts)."""
    d = dict(setup)
    if isinstance(d.get("canary"), CanaryChoice):
        d["canary"] = d["canary"].to_dict()
    if isinstance(d.get("dp"), DPConfig):
        d["dp"] = asdict(d["dp"])
    d["regularisers"] = list(d.get("regularisers") or [])
    return d


SETUP_KEYS = {"dataset", "arch", "regularisers", "canary", "seed", "train_size", "epochs", "patience", "ood_size",
              "lr", "batch_size", "candidates", "device", "dp"}


def setup_from_dict(d: dict) -> dict:
    """The inverse of :func:`setup_to_dict`.

    Raises:
        ValueError: unknown keys or invalid values (e.g. a canary mode that does not exist).
    """
    if not isinstance(d, dict) or set(d) - SETUP_KEYS:
        raise ValueError(f"a saved setup has the keys {', '.join(sorted(SETUP_KEYS))}; got {sorted(d)[:20]}")
    s = dict(d)
    if "canary" in s:
        s["canary"] = CanaryChoice.from_dict(s["canary"])
    if isinstance(s.get("dp"), dict):
        s["dp"] = DPConfig(**s["dp"])
    s["regularisers"] = list(s.get("regularisers") or [])
    return s


def _designs() -> Path:
    return Path(store().home) / "designs"


def _save_design() -> None:
    feature = st.session_state.get(FEATURE) or glyph("A")
    setup = st.session_state.get(SETUP) or default_setup()
    text = json.dumps({"feature": feature.to_dict(), "setup": setup_to_dict(setup)}, sort_keys=True, default=str)
    did = save_design(store().home, text)  # private (0600): typed text can be a patient's name
    st.session_state[_DESIGN_ID] = did
    _sync_url()
    from .access import set_browser_cookie
    set_browser_cookie(DESIGN_COOKIE, did)  # a link without ?design= (a new tab, /train?run=ID) finds it too


def _sync_url() -> None:
    did = st.session_state.get(_DESIGN_ID)
    if did and st.query_params.get(DESIGN) != did:
        st.query_params[DESIGN] = did


def load_design(did: str) -> tuple[Feature, dict]:
    """The feature and setup saved under ``did``.

    Raises:
        ValueError: ``did`` is not a design id (16 hex digits), or no readable design has it.
    """
    if not isinstance(did, str) or not re.fullmatch(r"[0-9a-f]{16}", did):
        raise ValueError("the design in the link is not a design id (16 hex digits)")
    path = _designs() / f"{did}.json"
    try:
        d = json.loads(path.read_text())
        return Feature.from_dict(d["feature"]), setup_from_dict(d["setup"])
    except FileNotFoundError:
        raise ValueError("the design in the link is not stored on this server") from None
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the design in the link cannot be read ({type(e).__name__})") from None


def _restore_design() -> None:
    """Once per session: take the feature and setup from ``?design=`` (a reload or a shared link),
    else from this browser's last design (a cookie: a link without ``?design=``, such as
    ``/train?run=ID``, opened in this browser keeps the feature it was working with), else from the
    run named by ``?run=`` (the feature that run measured, never the letter A by default)."""
    from .access import browser_cookie

    ss = st.session_state
    if ss.get(_DESIGN_TRIED):
        return
    ss[_DESIGN_TRIED] = True
    if FEATURE in ss or SETUP in ss:
        return
    did = st.query_params.get(DESIGN)
    if did:
        try:
            feature, setup = load_design(did)
        except ValueError as e:
            st.warning(f"{e}; starting from the letter A and the default setup.")
            st.query_params.pop(DESIGN, None)
            return
        ss[FEATURE], ss[SETUP], ss[_DESIGN_ID] = feature, setup, did
        return
    kept = browser_cookie(DESIGN_COOKIE)
    if kept:
        try:
            feature, setup = load_design(kept)
        except ValueError:
            pass  # a design of another server, or deleted: fall through quietly (the cookie is only a convenience)
        else:
            ss[FEATURE], ss[SETUP], ss[_DESIGN_ID] = feature, setup, kept
            return
    run = run_design(st.query_params.get("run"))
    if run is not None:
        ss[FEATURE], ss[SETUP] = run
        _save_design()


def run_design(run_id: str | None) -> tuple[Feature, dict] | None:
    """The feature and setup a stored run was made with, or None (no such run, or not an id)."""
    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{8,64}", run_id):
        return None
    try:
        cfg = store().get(run_id).config
    except Exception:  # unknown, deleted or unreadable: the page that shows the run says so
        return None
    setup = {k: getattr(cfg, k) for k in SETUP_KEYS if k != "dp"}
    setup["regularisers"] = list(cfg.regularisers)
    if "dp-sgd" in cfg.regularisers:
        setup["dp"] = cfg.dp
    return cfg.feature, setup


def config_from_setup(setup: dict | None = None, **overrides) -> ExperimentConfig:
    s = dict(current_setup() if setup is None else setup)
    s.update(overrides)
    keys = {"dataset", "arch", "regularisers", "canary", "seed", "train_size", "epochs", "patience", "ood_size",
            "lr", "batch_size", "candidates", "device", "dp"}
    kw = {k: v for k, v in s.items() if k in keys and v is not None}
    kw["regularisers"] = tuple(kw.get("regularisers", ()))
    # DP settings count only with dp-sgd on (with_dp: otherwise they would change the config key,
    # and the cache, of runs they do not affect); dp-sgd without settings gets the shared default.
    dp = kw.pop("dp", None)
    dp = DEFAULT_DP if dp is None else dp if isinstance(dp, DPConfig) else DPConfig(**dp)
    return ExperimentConfig(feature=current_feature(), data_dir=data_dir(), **kw).with_dp(dp)


@st.cache_resource(max_entries=4, show_spinner="Loading the trained model ...")
def model(run_id: str):
    """A finished run's model (read-only use: explanations); runs are immutable once done."""
    return store().load_model(run_id)


def short(run_id: str) -> str:
    return run_id[:8]


def asset(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / name


@st.cache_data(show_spinner=False, max_entries=8)
def ood_preview(dataset: str, shape: tuple[int, int, int], root: str, n: int = 2):
    """The first ``n`` inference images for a model trained on ``dataset`` (numpy, (n, C, H, W))."""
    from ufm.core.data import load_ood
    return load_ood(dataset, shape, n, data_dir=root).x.numpy()


def influence_path(ranking_key: str) -> Path:
    """Where the Influence page keeps the self-influence table of a ranking model."""
    return Path(store().home) / "influence" / f"{ranking_key}.csv"
