"""CLI verb ``ufm audit``: the black-box memorisation test of an ONNX model ufm did not train.

    ufm audit --model model.onnx --feature "text:JOHN DOE" --ood cifar10 [--input-size H W]
              [--channels 1|3] [--mean ... --std ...] [--classes names.txt] [--candidates K]
              [--out audit.json] [--report audit.html]
    ufm audit --list

The audit is recorded in the run store (``--home``) once it has finished; any error before that
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ufm.limits import MAX_CANDIDATES, MAX_FEATURE_SIDE, MAX_OOD_SIZE, MAX_REFERENCES, MAX_REPEATS
from ufm.runs.store import StoreError
from ufm.cli.common import (StderrProgress, UsageError, _nonneg_int, _pos_int, add_home, check_out, finite_float, int_in,
                     open_store)


def _read_classes(path: str) -> tuple[str, ...]:
    from ufm.fileio import read_bounded

    try:
        data = read_bounded(path, 1_000_000)  # a regular file only: /dev/zero or a pipe never ends
        if data is None:
            raise UsageError(f"--classes {path}: larger than 1 MB; give one class name per line")
        names = tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--classes {path}: cannot read it ({exc}); give a text file with one class name per line") from None
    if len(names) < 2:
        raise UsageError(f"--classes {path}: needs at least two class names, one per line")
    return names


def summary_lines(result: Any, audit_id: str | None) -> list[str]:
    s = result.score
    lines = [f"model {result.model_name} (sha256 {result.model_sha256[:16]}...): {result.input_spec['layout']} "
             f"{result.input_spec['channels']}x{result.input_spec['height']}x{result.input_spec['width']}, "
             f"{result.num_classes} classes, outputs read as {result.output_kind}",
             f"M = {s.M:.5g}  (X_u = {s.X_u:.5g}, X_r = {s.X_r:.5g}; nats, {result.n_ood} inference images)",
             f"t-test p = {s.p_value:.3g} (Welch, one-tailed)   paired p = {s.p_value_paired:.3g}  "
             "(the paper's statistics; they do not decide)",
             f"exposure p = {s.exposure_p_value:.3g} (rank {s.rank} of {len(s.candidate_X) + 1}, {s.family} candidates)",
             f"black-box confidence gain = {result.access.black_box_gain.gain:.4g} (class "
             f"{result.access.black_box_gain.label}, calibrated p = {result.access.black_box_gain.p_value:.3g})",
             f"verdict: {result.verdict.headline}", f"  {result.verdict.text}"]
    if result.verdict.calibration:
        lines.append(f"calibration: {result.verdict.calibration}")
    if audit_id:
        lines.append(f"audit {audit_id}")
    return lines


def _calibration_args(a: argparse.Namespace) -> dict[str, Any]:
    """calibrate_audit's arguments from --shadow-data / --references-from (empty: the fast test)."""
    if a.shadow_data and a.references_from:
        raise UsageError("give --shadow-data (ufm trains shadow models) or --references-from (your own models), not both")
    if a.references_from:
        return {"references_from": a.references_from,
                "spec": {"input_size": tuple(a.input_size) if a.input_size else None, "channels": a.channels,
                         "layout": a.layout, "mean": a.mean, "std": a.std}}
    if not a.shadow_data:
        return {}
    from ufm.audits.onnx_model import read_model_bytes
    from ufm.audits.shadow import ShadowRecipe

    recipe = ShadowRecipe(lr=a.shadow_lr, batch_size=a.shadow_batch_size, epochs=a.shadow_epochs,
                          patience=a.shadow_patience, train_size=a.shadow_train_size)
    return {"shadow_data": a.shadow_data, "references": a.references, "recipe": recipe,
            "model_bytes": read_model_bytes(a.model)[0], "device": a.device}


def cmd_audit(a: argparse.Namespace) -> int:
    if a.list:
        from ufm.audits.model_audit_store import list_model_audits
        with open_store(a) as store:
            records = list_model_audits(store)
        if not records:
            print(f"no audits in {store.db_path}", file=sys.stderr)
        from ufm.reports.html_page import fmt
        for r in records:
            row = r.to_row()
            print(f"{row['id']}  {row['created']}  {row['model']}  {row['feature']}  M = {fmt(row['M'])}  "
                  f"exposure p = {fmt(row['exposure_p_value'])}  {row['verdict']}")
        return 0
    missing = [f for f, v in (("--model", a.model), ("--ood", a.ood)) if not v]
    if missing:
        raise UsageError(f"{' and '.join(missing)} required: ufm audit --model model.onnx --feature SPEC --ood DATASET|FOLDER|NPZ")
    check_out(a.out)
    check_out(a.report, "--report")
    from ufm.audits.model_audit import ModelAuditConfig, run_model_audit
    from ufm.audits.model_audit_report import model_audit_html
    from ufm.audits.model_audit_store import save_model_audit
    from ufm.core.features import parse_feature_spec
    from ufm.fileio import atomic_write
    from ufm.audits.onnx_model import load_onnx
    from ufm.core.train import TrainingCancelled

    classes = _read_classes(a.classes) if a.classes else ()
    model = load_onnx(a.model, input_size=tuple(a.input_size) if a.input_size else None, channels=a.channels,
                      layout=a.layout, mean=a.mean, std=a.std)
    feature = parse_feature_spec(a.feature, a.feature_size, offset=tuple(a.offset), intensity=a.intensity)
    config = ModelAuditConfig(feature=feature, ood=a.ood, ood_size=a.ood_size, labelled=a.labelled,
                              canary_label=a.canary_class, repeats=a.repeats, candidates=a.candidates,
                              family=a.candidate_kind, seed=a.seed, data_dir=a.data_dir, classes=classes)
    calibrate = _calibration_args(a)
    try:
        result = run_model_audit(model, config, progress=StderrProgress(a.quiet))
        if calibrate:
            from ufm.audits.shadow import calibrate_audit
            with open_store(a) as store:
                result = calibrate_audit(store, result, model, progress=StderrProgress(a.quiet), **calibrate)
    except TrainingCancelled as exc:
        raise UsageError(f"{exc}; nothing was saved") from exc
    audit_id = None
    if not a.no_store:
        with open_store(a) as store:
            try:
                audit_id = save_model_audit(store, result)
            except StoreError as exc:
                raise UsageError(str(exc)) from exc
    if a.out == "-":
        print(json.dumps({"id": audit_id, **result.to_dict()}, indent=1))
    elif a.out:
        atomic_write(Path(a.out), json.dumps({"id": audit_id, **result.to_dict()}, indent=1), private=True)
    if a.report:
        atomic_write(Path(a.report), model_audit_html(result, audit_id), private=True)
    stream = sys.stderr if a.out == "-" else sys.stdout
    for line in summary_lines(result, audit_id):
        print(line, file=stream)
    for path in (a.out, a.report):
        if path and path != "-":
            print(f"wrote {path}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add ``audit`` to the ``ufm`` subcommands."""
    p = sub.add_parser("audit", help="black-box memorisation test of an ONNX model you did not train",
                       description="Measure whether an ONNX image classifier memorised a unique feature, from its "
                                   "outputs alone (no training data, no weights). The model runs in onnxruntime; it "
                                   "is never unpickled.")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="FILE", help="the .onnx file")
    m.add_argument("--input-size", type=_pos_int, nargs=2, metavar=("H", "W"), default=None,
                   help="input height and width (needed when the graph leaves them dynamic)")
    m.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="input channels (needed when the graph leaves them dynamic)")
    m.add_argument("--layout", choices=["NCHW", "NHWC"], default=None, help="input layout (default: from the graph)")
    m.add_argument("--mean", type=finite_float, nargs="+", default=None,
                   help="input normalisation mean, one value or one per channel, for pixels in [0, 1] "
                        "(default: the file's ufm metadata, else none)")
    m.add_argument("--std", type=finite_float, nargs="+", default=None, help="input normalisation std (with --mean)")
    m.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line (checked against K)")
    f = p.add_argument_group("feature")
    f.add_argument("--feature", default="A", help="a glyph (A, X, plus, ...), text:JOHN DOE, or an image path")
    f.add_argument("--feature-size", type=int_in(1, MAX_FEATURE_SIDE), default=None,
                   help="glyph/image size m (m x m), or the text height")
    f.add_argument("--offset", type=_nonneg_int, nargs=2, metavar=("ROW", "COL"), default=(1, 1),
                   help="top-left pixel of the feature (default 1 1)")
    f.add_argument("--intensity", type=finite_float, default=1.0, help="feature brightness in (0, 1]")
    d = p.add_argument_group("images")
    d.add_argument("--ood", default=None, metavar="DATASET|FOLDER|NPZ",
                   help="inference images: a benchmark (its test split), a folder of images, or an .npz with uint8 x")
    d.add_argument("--ood-size", type=int_in(2, MAX_OOD_SIZE), default=1000, help="how many inference images")
    d.add_argument("--labelled", default=None, metavar="DATASET|NPZ",
                   help="in-domain labelled images (x, y) for the white- and grey-box gains and the accuracy check")
    d.add_argument("--canary-class", type=_nonneg_int, default=None, metavar="C",
                   help="the class the feature's training images had, if known (white-box gain)")
    d.add_argument("--data-dir", default=None, help="where datasets live (default $UFM_DATA_DIR or ~/.cache/ufm/data)")
    s = p.add_argument_group("score")
    s.add_argument("--candidates", type=int_in(1, MAX_CANDIDATES), default=99,
                   help=f"K candidate features for the exposure test (1..{MAX_CANDIDATES})")
    s.add_argument("--candidate-kind", default="auto",
                   choices=["auto", "permute", "strings", "strokes", "shift", "bernoulli", "uniform"],
                   help="candidate family; auto = one the calibration study found calibrated for the feature's kind")
    s.add_argument("--repeats", type=int_in(1, MAX_REPEATS), default=1, help="R random features per image")
    s.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (>= 0)")
    c = p.add_argument_group("calibration (rank the model's M among models trained without the feature)")
    c.add_argument("--shadow-data", default=None, metavar="DATASET|FOLDER|NPZ",
                   help="labelled in-domain images (a benchmark, a folder of class sub-folders, or an .npz with x "
                        "and y) on which ufm trains shadow models of the audited architecture; they are runs in the "
                        "store, reused for every later feature")
    c.add_argument("--references", type=int_in(19, MAX_REFERENCES), default=39,
                   help="how many shadow models R (p-values down to 1/(R+1); default 39)")
    c.add_argument("--references-from", default=None, metavar="DIR",
                   help="a folder of R >= 19 ONNX models you trained without the feature (same architecture)")
    c.add_argument("--shadow-lr", type=finite_float, default=1e-3, help="shadows' Adam learning rate")
    c.add_argument("--shadow-batch-size", type=_pos_int, default=128, help="shadows' batch size")
    c.add_argument("--shadow-epochs", type=_pos_int, default=100, help="shadows' maximum epochs")
    c.add_argument("--shadow-patience", type=_pos_int, default=10,
                   help="shadows' early stopping patience (epochs without validation improvement)")
    c.add_argument("--shadow-train-size", type=int_in(20, 10**9), default=None,
                   help="train shadows on this many images of the shadow data (default all)")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where shadows train")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="write the audit JSON here ('-' for stdout)")
    o.add_argument("--report", default=None, metavar="FILE", help="write a self-contained HTML report here")
    o.add_argument("--no-store", action="store_true", help="do not record the audit in the run store")
    o.add_argument("--list", action="store_true", help="list the recorded audits and exit")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_home(p)
    p.set_defaults(func=cmd_audit)
