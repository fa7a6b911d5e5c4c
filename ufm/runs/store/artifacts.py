"""A run's artifacts: the files under ``runs/<id>/`` (result, weights, checkpoints, scores,
training history), written atomically and privately, loaded without ever unpickling.

A mixin of :class:`ufm.runs.store.Store`: it finds the runs it checks through
:meth:`~ufm.runs.store.lifecycle.RunLifecycle.get`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ufm.fileio import atomic_write, private_dir
from ufm.runs.store.database import RunNotFound, StoreError

if TYPE_CHECKING:  # torch and the experiment module are imported lazily: `ufm runs list` stays fast
    import numpy as np
    from torch import nn

    from ufm.core.experiment import Result
    from ufm.core.train import Checkpoint, EpochLog


class Artifacts:
    """The artifact folders of a :class:`ufm.runs.store.Store` (``runs_dir`` is set by the database)."""

    runs_dir: Path

    def run_dir(self, run_id: str) -> Path:
        if not run_id or any(ch not in "0123456789abcdef" for ch in run_id):
            raise RunNotFound(f"{run_id!r} is not a run id (12 hex digits)")
        return self.runs_dir / run_id

    def _write_artifacts(self, run_id: str, result: "Result") -> None:
        import numpy as np
        import torch

        d = private_dir(self.run_dir(run_id))
        if result.model is not None:
            inner = getattr(result.model, "_module", result.model)
            state = {k: v.detach().to("cpu") for k, v in inner.state_dict().items()}
            _atomic_write(d / "model.pt", lambda f: torch.save(state, f))
        if result.checkpoints:
            cps = [{"step": int(c.step), "epoch": float(c.epoch), "lr": float(c.lr), "train_loss": float(c.train_loss),
                    "state_dict": {k: v.detach().to("cpu") for k, v in c.state_dict.items()}}
                   for c in result.checkpoints]
            _atomic_write(d / "checkpoints.pt", lambda f: torch.save(cps, f))
        if result.score is not None:  # a privacy-audit run has no d_u, d_r: its scores are in result.json
            _atomic_write(d / "d_u.npy", lambda f: np.save(f, np.asarray(result.score.d_u, np.float64),
                                                           allow_pickle=False))
            _atomic_write(d / "d_r.npy", lambda f: np.save(f, np.asarray(result.score.d_r, np.float64),
                                                           allow_pickle=False))
        _atomic_write(d / "history.json", lambda f: f.write(json.dumps([asdict(h) for h in result.history]).encode()))
        _atomic_write(d / "result.json", lambda f: f.write(result.to_json().encode()))

    def artifact(self, run_id: str, name: str) -> Path:
        """The path of artifact ``name`` of a run (``result.json``, ``model.pt``, ...).

        Raises:
            StoreError: the file does not exist; the message says why (unfinished run, deleted).
        """
        p = self.run_dir(run_id) / name
        if not p.is_file():
            rec = self.get(run_id)
            why = (f"the run is {rec.status}" if rec.status != "done"
                   else "the file is missing (deleted by hand?); rerun with force=True / --force")
            raise StoreError(f"run {run_id} has no {name} at {p}: {why}")
        return p

    def load_result(self, run_id: str, *, with_model: bool = False) -> "Result":
        """The full :class:`ufm.core.experiment.Result` of a done run (``model`` attached if asked)."""
        from ufm.core.experiment import Result

        p = self.artifact(run_id, "result.json")
        try:
            result = Result.from_json(p.read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{p} is not a readable ufm result ({e}); delete the run and rerun it") from e
        if with_model:
            result.model = self.load_model(run_id)
        return result

    def load_scores(self, run_id: str) -> tuple["np.ndarray", "np.ndarray"]:
        """``(d_u, d_r)``: (N,) and (R, N) float64 KL divergences (nats) of a done run."""
        d_u = _load_npy(self.artifact(run_id, "d_u.npy"))
        d_r = _load_npy(self.artifact(run_id, "d_r.npy"))
        if d_u.ndim != 1 or d_r.ndim != 2 or d_r.shape[1] != d_u.shape[0]:
            raise StoreError(f"run {run_id}: d_u {d_u.shape} and d_r {d_r.shape} do not match ((N,) and (R, N)); "
                             "delete the run and rerun it")
        return d_u, d_r

    def load_history(self, run_id: str) -> list["EpochLog"]:
        from ufm.core.train import EpochLog

        p = self.artifact(run_id, "history.json")
        try:
            return [EpochLog(**h) for h in json.loads(p.read_text())]
        except (ValueError, TypeError) as e:
            raise StoreError(f"{p} is not a readable training history ({e})") from e

    def load_model(self, run_id: str, *, device: str = "cpu") -> "nn.Module":
        """Rebuild the trained model of a done run (architecture from its config, shape from the
        saved data shape) and load its best weights. Returns it in eval mode on ``device``."""
        from ufm.core.models import build_model

        rec = self.get(run_id)
        if rec.status != "done":
            raise StoreError(f"run {run_id} is {rec.status}; only finished (done) runs have weights")
        if not rec.model_meta:
            raise StoreError(f"run {run_id} was recorded without its weights (no model.pt); rerun it to get a model")
        p = self.artifact(run_id, "model.pt")
        state = _load_tensors(p)
        if not isinstance(state, dict) or not all(isinstance(k, str) and _is_tensor(v) for k, v in state.items()):
            raise StoreError(f"{p} is not a state dict (a mapping of names to tensors); delete the run and rerun it")
        cfg = rec.config
        c, h, w = rec.model_meta["input_shape"]
        model = build_model(cfg.arch, c, (h, w), rec.model_meta["num_classes"],
                            dropout=cfg.dropout if "dropout" in cfg.regularisers else 0.0,
                            batchnorm="batchnorm" in cfg.regularisers)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise StoreError(f"{p} does not fit a {cfg.arch} for {c}x{h}x{w} images: "
                             f"{str(e).splitlines()[0]}; delete the run and rerun it") from e
        return model.to(device).eval()

    def load_checkpoints(self, run_id: str) -> list["Checkpoint"]:
        """The TracIn checkpoints of a done run (empty if it kept none)."""
        from ufm.core.train import Checkpoint

        p = self.run_dir(run_id) / "checkpoints.pt"
        if not p.is_file():
            self.artifact(run_id, "result.json")  # a clear error for unfinished runs
            return []
        raw = _load_tensors(p)
        try:
            return [Checkpoint(int(c["step"]), float(c["epoch"]), float(c["lr"]), float(c["train_loss"]),
                               dict(c["state_dict"])) for c in raw]
        except (TypeError, KeyError, ValueError) as e:
            raise StoreError(f"{p} is not a list of ufm checkpoints ({e}); delete the run and rerun it") from e


def _is_tensor(v: Any) -> bool:
    import torch
    return isinstance(v, torch.Tensor)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Artifacts are written atomically and kept private (0600): they can show a private feature,
    e.g. a patient's name."""
    atomic_write(path, write, private=True)


def _load_tensors(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would run code
    is refused by torch's weights-only unpickler before anything in it executes."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear StoreError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"refused to load {path}: it is not a plain tensor file written by ufm ({first}). Nothing in "
                         "it was executed. Delete the run ('ufm runs delete ID') and rerun it.") from e


def _load_npy(path: Path) -> "np.ndarray":
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"refused to load {path}: not a plain numeric .npy file ({e}). Nothing in it was "
                         "executed. Delete the run and rerun it.") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise StoreError(f"{path} does not hold a numeric array; delete the run and rerun it")
    return arr.astype(np.float64, copy=False)
