"""A calibrated verdict for a model ufm did not train: rank its M among shadow or supplied models.

ufm's own runs are calibrated by a bank of reference models (:mod:`ufm.measure.bank`): models of
the same training setting without the canary, whose M for the feature the run's M is ranked among.
For an ONNX model the auditor did not train, the same test needs models of its architecture
trained the same way on similar data without the feature, which are not at hand. Two ways in:

* **Shadow models** (:func:`shadow_config`): the audited graph, converted and re-initialised
  (:mod:`ufm.audits.onnx_torch`, architecture ``"onnx:<sha256>"``), trained by ufm's own training
  code on auditor-supplied labelled in-domain data with a stated recipe (default: Adam, early
  stopping on a validation split). They are a bank like any other: R runs in the store
  (:func:`ufm.measure.bank.bank_configs` of the shadow config), trained in the background,
  resumable, cancellable, and reused for every later feature.
* **Supplied references** (:func:`reference_models`): R ONNX files the auditor trained without the
  feature (earlier versions, retrained copies), run by onnxruntime like the target.

Each is scored with exactly the audit's scoring (:func:`ufm.measure.scores.feature_effect` on the
audit's inference images with the audit's feature, repeats, random features and seed: the arrays
whose means give the audit's M), and the target's M is ranked among them
(:func:`ufm.measure.bank.rank_test`): ``p = (1 + #{M_ref >= M}) / (R + 1)``. The calibration rests on
an assumption the verdict states: the shadows (or supplied models) were trained like the target on
similar data; :data:`MISCALIBRATION_NOTE` says what the benchmark found when they were not.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ufm.core.data import BENCHMARKS, DataUnavailable
from ufm.measure.bank import DEFAULT_REFERENCES, SCORES_FILE, ReferenceTest, check_references, rank_test
from ufm.measure.verdict import INCONCLUSIVE, MEMORISED, NOT_SHOWN, Verdict

if TYPE_CHECKING:
    from ufm.audits.model_audit import ModelAuditConfig, ModelAuditResult
    from ufm.audits.onnx_model import OnnxModel
    from ufm.core.experiment import ExperimentConfig
    from ufm.runs.store import Store

#: What benchmarks/foreign_audit.py measured when the target's recipe differs from the shadows'
#: (see benchmarks/results/foreign_audit.md); shown with every shadow verdict.
MISCALIBRATION_NOTE = ("ufm's benchmark (benchmarks/foreign_audit.py: MNIST, 500 or 250 training images, 39 shadows) "
                       "audited clean models trained by another script: with the shadows' recipe it called 9 of 200 "
                       "MLPs memorised (4.5%, above the 2.5% level; 11 of 200 on the shadows' own images) and 0 of 40 "
                       "cnn1; with augmentation the shadows lacked, 2 of 40 cnn1 (5%); with SGD instead of Adam, 1 of "
                       "200 MLPs. A p at the floor is weaker evidence for a foreign model than for ufm's own runs. When "
                       "the recipe is unknown, train a bank for each plausible recipe and trust a call only if every "
                       "bank makes it.")


@dataclass(frozen=True)
class ShadowRecipe:
    """How the shadows are trained (ufm's :func:`ufm.core.train.train`: Adam, early stopping on a
    validation split). ``lr``: Adam's step size; ``epochs``/``patience``: at most this many
    epochs, stop after ``patience`` without validation improvement; ``train_size``: the first N
    (stratified) images of the shadow data, None = all; ``regularisers``: as ufm's runs."""

    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 100
    patience: int = 10
    val_fraction: float = 0.1
    train_size: int | None = None
    regularisers: tuple[str, ...] = ()
    weight_decay: float = 5e-4

    def describe(self) -> str:
        regs = ", ".join(self.regularisers) or "no regularisers"
        size = f"{self.train_size} images" if self.train_size else "all images"
        return (f"Adam lr {self.lr:g}, batch {self.batch_size}, at most {self.epochs} epochs with early stopping "
                f"(patience {self.patience}, {self.val_fraction:.0%} validation), {regs}, {size}")


# ------------------------------------------------------------------------------------ shadow data

def shadow_dataset(source: str, shape: Sequence[int], num_classes: int, *, home: str | Path,
                   data_dir: str | None = None) -> str:
    """The dataset name of the shadows' training data, checked against the model.

    ``source``: a benchmark name, a folder (``train.npz``/``test.npz``, or class sub-folders), or an
    ``.npz`` with uint8 images ``x`` and labels ``y``; an ``.npz`` is split 80/20 (seeded) and kept
    in ``<home>/shadow_data/<sha256>/`` so the runs that train on it can find it again.

    Raises:
        DataUnavailable: unreadable data, or images whose (C, H, W) is not ``shape``, or labels that
            are not the model's ``num_classes`` classes; one line saying what is expected.
    """
    from ufm.core.data import load_split

    path = Path(source).expanduser()
    if source not in BENCHMARKS and path.is_file() and path.suffix == ".npz":
        source = _keep_npz(path, home)
    try:
        d = load_split(source, "train", data_dir=data_dir, limit=4096)
    except ValueError as exc:
        raise DataUnavailable(f"shadow data {source}: {exc}") from None
    c, h, w = (int(v) for v in shape)
    if tuple(d.image_shape) != (c, h, w):
        got = "x".join(str(v) for v in d.image_shape)
        raise DataUnavailable(f"shadow data images are {got} (C x H x W) but the model takes {c}x{h}x{w}: give "
                              f"labelled {'greyscale' if c == 1 else 'RGB'} images of {h}x{w} pixels")
    if d.num_classes != int(num_classes):
        raise DataUnavailable(f"shadow data has {d.num_classes} classes but the model outputs {num_classes} class "
                              "scores: give labelled images of the model's own classes (labels 0..K-1 in its order)")
    return source


def _keep_npz(path: Path, home: str | Path) -> str:
    from ufm.fileio import atomic_write

    try:
        with np.load(path, allow_pickle=False) as f:
            if not {"x", "y"} <= set(f.files):
                raise DataUnavailable(f"{path} needs arrays x (uint8 images, (N, H, W) or (N, H, W, 3)) and y (labels)")
            x, y = np.asarray(f["x"]), np.asarray(f["y"]).reshape(-1)
    except (OSError, ValueError) as exc:
        raise DataUnavailable(f"could not read {path}: {exc}") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y) or len(x) < 20:
        raise DataUnavailable(f"{path}: x must be at least 20 uint8 images (N, H, W) or (N, H, W, 3) with one label "
                              f"each in y; got x {x.dtype} {x.shape}, y {y.shape}")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))  # stored (N, C, H, W)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]

    buf = io.BytesIO()
    np.savez(buf, x=x, y=y.astype(np.int64))
    folder = Path(home) / "shadow_data" / hashlib.sha256(buf.getvalue()).hexdigest()[:32]
    if not (folder / "test.npz").is_file():
        order = np.random.default_rng(0).permutation(len(x))
        cut = int(round(0.8 * len(x)))
        classes = np.array([str(k) for k in range(int(y.max()) + 1)])
        for name, idx in (("train", np.sort(order[:cut])), ("test", np.sort(order[cut:]))):
            out = io.BytesIO()
            np.savez(out, x=x[idx], y=y[idx].astype(np.int64), classes=classes)
            atomic_write(folder / f"{name}.npz", out.getvalue(), private=True)  # 0700 folders, made if missing
    return str(folder)


def shadow_ood(source: str, x: torch.Tensor, *, home: str | Path) -> str:
    """The inference images the shadow runs read: ``source`` when a run can read it (a benchmark or
    a folder holding ``test.npz``); else (an ``.npz`` file, a folder of image files) the audit's own
    images ``x`` ((N, C, H, W) in [0, 1]), kept as uint8 in ``<home>/shadow_data/<sha256>/test.npz``."""
    from ufm.fileio import atomic_write

    if source in BENCHMARKS or (Path(source).expanduser() / "test.npz").is_file():
        return source
    u8 = np.round(x.detach().cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
    u8 = u8[:, 0] if u8.shape[1] == 1 else np.transpose(u8, (0, 2, 3, 1))
    buf = io.BytesIO()
    np.savez(buf, x=u8, y=np.zeros(len(u8), np.int64), classes=np.array(["0"]))
    folder = Path(home) / "shadow_data" / hashlib.sha256(buf.getvalue()).hexdigest()[:32]
    if not (folder / "test.npz").is_file():
        atomic_write(folder / "test.npz", buf.getvalue(), private=True)
    return str(folder)


# ------------------------------------------------------------------------------------ the bank

def shadow_config(arch: str, dataset: str, recipe: ShadowRecipe = ShadowRecipe(), *, ood: str | None = None,
                  data_dir: str | None = None, device: str = "auto") -> "ExperimentConfig":
    """The training setting of the shadows (canary-free); its bank
    (:func:`ufm.measure.bank.bank_configs`) is the R shadow runs. ``ood``: the audit's inference
    images, which a run needs (its canonical 2-image score; the audit rescores every shadow)."""
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig

    return ExperimentConfig(arch=arch, dataset=dataset, data_dir=data_dir, lr=float(recipe.lr),
                            batch_size=int(recipe.batch_size), epochs=int(recipe.epochs), patience=int(recipe.patience),
                            val_fraction=float(recipe.val_fraction), train_size=recipe.train_size,
                            regularisers=tuple(recipe.regularisers), weight_decay=float(recipe.weight_decay),
                            canary=CanaryChoice("none", ()), ood_source=ood, device=device)


def prepare_shadows(store: "Store", model: "OnnxModel", data: bytes, x: torch.Tensor, source: str,
                    recipe: ShadowRecipe = ShadowRecipe(), *, data_dir: str | None = None,
                    ood: str | None = None, device: str = "auto") -> "ExperimentConfig":
    """Check and keep the audited model's architecture and the shadow data in ``store``; returns
    the shadow config (pass it to :func:`ufm.measure.bank.bank_status` / ``build_bank`` /
    ``submit_bank``). ``data``: the model file's bytes; ``x``: inference images for the conversion check."""
    from ufm.audits.onnx_torch import keep_onnx

    arch = keep_onnx(store.home, data, model, x)
    dataset = shadow_dataset(source, model.spec.shape, model.num_classes or 2, home=store.home, data_dir=data_dir)
    return shadow_config(arch, dataset, recipe, ood=ood, data_dir=data_dir, device=device)


# ------------------------------------------------------------------------------------ scoring

def audit_score_key(config: "ModelAuditConfig") -> str:
    """What fixes a model's M for an audit: feature, inference images, scoring randomness."""
    d = {"audit": 1, "feature": config.feature.to_dict(), "ood": config.ood, "ood_size": config.ood_size,
         "repeats": config.repeats, "random_kind": config.random_kind, "seed": config.seed}
    return "audit:" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def score_model(model: torch.nn.Module, x: torch.Tensor, config: "ModelAuditConfig") -> float:
    """The audit's M of ``config.feature`` for ``model`` on inference images ``x`` (nats): the
    computation of :func:`ufm.audits.model_audit.run_model_audit`'s M (same arrays, same seed)."""
    from ufm.measure.scores import feature_effect

    with torch.no_grad():
        d_u, d_r = feature_effect(model, x, config.feature, repeats=config.repeats, random_kind=config.random_kind,
                                  seed=config.seed, batch_size=config.batch_size)
    return float(np.mean(d_u) - np.mean(d_r))


def shadow_scores(store: "Store", run_ids: Sequence[str], x: torch.Tensor, config: "ModelAuditConfig", *,
                  cancel: Any = None) -> np.ndarray:
    """M of the audit's feature on each shadow run (nats), (R,) float64; cached per run and score key."""
    from ufm.core.train import TrainingCancelled, is_cancelled
    from ufm.fileio import atomic_write

    key = audit_score_key(config)
    out = []
    for run_id in run_ids:
        if is_cancelled(cancel):
            raise TrainingCancelled("cancelled while scoring the shadow models")
        path = store.run_dir(run_id) / SCORES_FILE
        try:
            cache = json.loads(path.read_text())
            cache = cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            cache = {}
        if not isinstance(cache.get(key), (int, float)):
            cache[key] = score_model(store.load_model(run_id), x, config)
            atomic_write(path, json.dumps(cache), private=True)
        out.append(float(cache[key]))
    return np.asarray(out, dtype=np.float64)


def reference_models(folder: str | Path, spec: dict[str, Any]) -> list["OnnxModel"]:
    """The ONNX files in ``folder`` (sorted by name), opened with the target's input statements
    ``spec`` (``input_size``, ``channels``, ``layout``, ``mean``, ``std`` as for ``load_onnx``)."""
    from ufm.audits.onnx_model import load_onnx

    files = sorted(p for p in Path(folder).expanduser().glob("*.onnx") if p.is_file())
    if not files:
        raise DataUnavailable(f"no .onnx files in {folder}: --references-from needs the R models you trained "
                              "without the feature, one .onnx file each")
    check_references(len(files))
    return [load_onnx(f, **spec) for f in files]


def supplied_scores(models: Sequence["OnnxModel"], x: torch.Tensor, config: "ModelAuditConfig",
                    shape: Sequence[int], num_classes: int) -> np.ndarray:
    """M of the audit's feature on each supplied reference model (run by onnxruntime, like the target)."""
    out = []
    for m in models:
        if tuple(m.spec.shape) != tuple(shape):
            raise DataUnavailable(f"reference model {m.name} takes {m.spec.shape} (C, H, W) but the audited model takes "
                                  f"{tuple(shape)}: give models of the same architecture")
        m.probe(x)
        if m.num_classes != num_classes:
            raise DataUnavailable(f"reference model {m.name} outputs {m.num_classes} class scores, the audited model "
                                  f"{num_classes}: give models of the same classes")
        out.append(score_model(m, x, config))
    return np.asarray(out, dtype=np.float64)


# ------------------------------------------------------------------------------------ the verdict

def calibrated_verdict(result: "ModelAuditResult", test: ReferenceTest, supplied: str, *, shadows: bool) -> "ModelAuditResult":
    """``result`` with the verdict of the rank test ``test`` (and the test itself under
    ``reference``). A model that ignores its input or did not learn keeps its inconclusive
    verdict: ranking cannot make it speak. ``supplied``: what the auditor gave, in words."""
    what = "shadow models ufm trained" if shadows else "reference models you supplied"
    assumption = (f"Calibrated on {test.references} {what} without the feature ({supplied}), assuming they were "
                  "trained like the audited model on similar data with a similar recipe; if they were not, the "
                  "false-positive rate can differ from the level.")
    note = assumption + (" " + MISCALIBRATION_NOTE if shadows else "")
    old = result.verdict
    reason = result.family_reason or ""
    no_family = bool(reason) and old.text.startswith(reason[:1].upper() + reason[1:])  # a rank test needs no family
    if not old.learned or (old.test == "none" and not no_family):  # did not learn, or ignores its input
        verdict = Verdict(INCONCLUSIVE, "none", None, old.text, note, learned=old.learned)
    else:
        beaten = test.references + 1 - test.rank
        if test.memorised:
            text = (f"Memorised at the {test.alpha:.0%} level: the model's M for this feature ({test.observed_M:.4g}) "
                    f"is larger than on all {test.references} {what} without it (calibrated p = {test.p_value:.2g}).")
        else:
            text = (f"No evidence of memorisation at the {test.alpha:.0%} level: the model's M for this feature "
                    f"({test.observed_M:.4g}) exceeds {beaten} of {test.references} {what} without it (calibrated "
                    f"p = {test.p_value:.2g}). This does not prove the feature was not memorised.")
        verdict = Verdict(MEMORISED if test.memorised else NOT_SHOWN, "reference", test.p_value, text, note)
    return replace(result, verdict=verdict, reference={**test.to_dict(), "supplied": supplied, "shadows": bool(shadows)})


def calibrate_audit(store: "Store", result: "ModelAuditResult", model: "OnnxModel", *, model_bytes: bytes | None = None,
                    shadow_data: str | None = None, references: int = DEFAULT_REFERENCES,
                    references_from: str | None = None, spec: dict[str, Any] | None = None,
                    recipe: ShadowRecipe = ShadowRecipe(), x: torch.Tensor | None = None,
                    progress: Any = None, cancel: Any = None, device: str = "auto") -> "ModelAuditResult":
    """The audit ``result`` of ``model`` with a calibrated verdict, in this process (the CLI).

    With ``shadow_data``: keep the architecture and data, train the missing shadows of the bank
    (``references`` of them; finished ones are reused from the store), score, rank. With
    ``references_from``: open the folder's ONNX models (input statements ``spec``), score, rank.
    ``x``: the audit's inference images (read again from ``result.config`` when None).
    """
    from ufm.audits.audit_images import audit_inference_images
    from ufm.measure.bank import bank_configs
    from ufm.runs.banks import build_bank, report_bank_progress

    config = result.config
    if x is None:
        x = audit_inference_images(config.ood, model.spec.shape, config.ood_size, data_dir=config.data_dir)
    x = x[:config.ood_size]
    if references_from:
        models = reference_models(references_from, spec or {})
        refs = supplied_scores(models, x, config, model.spec.shape, model.num_classes or 2)
        test = rank_test(result.score.M, refs, config.alpha, [m.name for m in models])
        return calibrated_verdict(result, test, f"{len(models)} ONNX models from {references_from}", shadows=False)
    if not shadow_data:
        raise ValueError("give shadow_data or references_from")
    r = check_references(references)
    if model_bytes is None:
        raise ValueError("model_bytes (the audited file's bytes) are needed to build its shadows")
    cfg = prepare_shadows(store, model, model_bytes, x, shadow_data, recipe, data_dir=config.data_dir,
                          ood=shadow_ood(config.ood, x, home=store.home), device=device)
    run_ids = build_bank(store, cfg, r, progress=report_bank_progress(progress), cancel=cancel)
    refs = shadow_scores(store, run_ids, x, config, cancel=cancel)
    test = rank_test(result.score.M, refs, config.alpha, run_ids)
    n = len(bank_configs(cfg, r))
    return calibrated_verdict(result, test, f"{n} shadows trained on {shadow_data} with {recipe.describe()}",
                              shadows=True)


def shadow_audit_task(report: Any, model_path: str, config: dict[str, Any], spec: dict[str, Any], home: str,
                      audit_id: str, cancel_path: str | None, calibration: dict[str, Any]) -> None:
    """A background audit with a calibrated verdict (the dashboard's tasks): as
    :func:`ufm.audits.model_audit_store.model_audit_task`, then :func:`calibrate_audit` with ``calibration``
    (``shadow_data``, ``references``, ``recipe`` (a :class:`ShadowRecipe` as a dict) or
    ``references_from``). The shadows are trained here, each a run in the store: a cancelled
    audit keeps the finished ones, and the next audit of this model reuses them."""
    from ufm.audits.model_audit import ModelAuditConfig, run_model_audit
    from ufm.audits.model_audit_store import save_model_audit
    from ufm.audits.onnx_model import load_onnx, read_model_bytes
    from ufm.runs.store import Store

    statements = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()}
    model = load_onnx(model_path, **statements)
    cancel = (lambda: Path(cancel_path).exists()) if cancel_path else None
    cfg = ModelAuditConfig.from_dict(config)
    result = run_model_audit(model, cfg, progress=lambda p: report(p.message), cancel=cancel)
    kw: dict[str, Any] = {}
    if calibration.get("references_from"):
        kw = {"references_from": calibration["references_from"],
              "spec": {k: v for k, v in statements.items() if k != "name"}}  # each reference keeps its own name
    else:
        r = dict(calibration.get("recipe") or {})
        r["regularisers"] = tuple(r.get("regularisers") or ())
        kw = {"shadow_data": calibration["shadow_data"], "references": int(calibration.get("references",
                                                                                        DEFAULT_REFERENCES)),
              "recipe": ShadowRecipe(**r), "model_bytes": read_model_bytes(model_path)[0]}
    with Store(home) as store:
        result = calibrate_audit(store, result, model, progress=lambda p: report(p.message), cancel=cancel, **kw)
        save_model_audit(store, result, audit_id)
    report(f"done: {result.verdict.headline}")
