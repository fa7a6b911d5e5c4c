"""How far the shadow-model calibration bends: audits of models trained by a plain torch script.

The auditor's case (issue 20): an ONNX model ufm did not train, the feature, and labelled in-domain
data. ``ufm audit --shadow-data`` converts the graph, trains R shadows with ufm's training code
(Adam, early stopping) on the auditor's data and ranks the target's M among them. Here the targets
are trained by :func:`train_target`, a plain torch loop that is *not* ufm's code, with its own seed,
its own random 500-image subset of MNIST (disjoint from the shadows' images), and one of these
recipes:

* ``matched``: the shadows' recipe (Adam lr 1e-3, batch 64, early stopping on a 10% validation
  split, patience 5, at most 30 epochs), re-implemented;
* ``sgd``: SGD lr 0.05, momentum 0.9 (otherwise matched);
* ``augment``: matched plus random shifts of up to 2 pixels;
* ``samedata``: matched, but on the shadows' own images (a control: only the code and seed differ).

Clean targets give the false-positive rate of the verdict (calibrated p < 0.05) per recipe;
targets with the feature (the paper's 5x5 "A" at rows/cols 1..5) stamped on 1, 3 or 10 random
training images (labels kept; matched recipe) give the detection rate. Every audit uses ufm's own
functions (``run_model_audit``, ``calibrate_audit``'s scoring). Rows go to
``benchmarks/results/foreign_audit-<arch>.jsonl`` (one JSON object per target, appended; a rerun
skips targets already there), the shadow bank to the store ``--home`` (resumable).

    nice -n 15 python benchmarks/foreign_audit.py run --arch mlp
    nice -n 15 python benchmarks/foreign_audit.py run --arch cnn1 --clean 20 --canary 5 --train-images 250 --epochs 10 --patience 3
    python benchmarks/foreign_audit.py report     # Markdown table -> benchmarks/results/foreign_audit.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ("matched", "sgd", "augment", "samedata")
SHADOW_IMAGES = 500   # the auditor's shadow data: MNIST training images 0..499
TARGET_POOL = 10_000  # targets draw their 500 images from MNIST training images 10000..59999
TRAIN_IMAGES = 500


def _torch():
    import torch
    torch.set_num_threads(1)
    return torch


def target_net(arch: str):
    """The target's architecture, written here (not ufm.core.models): (N, 1, 28, 28) -> (N, 10)."""
    torch = _torch()
    nn = torch.nn
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def train_target(arch: str, x, y, recipe: str, seed: int, epochs: int = 30, patience: int = 5):
    """A plain training loop: ``x`` (N, 1, 28, 28) float in [0, 1], ``y`` (N,) int64. Returns the model (eval)."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = target_net(arch)
    perm = torch.randperm(len(x), generator=g)
    n_val = len(x) // 10
    xv, yv, xt, yt = x[perm[:n_val]], y[perm[:n_val]], x[perm[n_val:]], y[perm[n_val:]]
    opt = (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) if recipe == "sgd"
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    best, best_state, bad = float("inf"), None, 0
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            xb = xt[idx]
            if recipe == "augment":
                dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yt[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float(torch.nn.functional.cross_entropy(net(xv), yv))
        if v < best - 1e-4:
            best, best_state, bad = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    return net.eval()


def export(net, path: Path) -> bytes:
    torch = _torch()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path.read_bytes()


def cmd_run(a: argparse.Namespace) -> None:
    torch = _torch()
    from ufm.audits.audit_images import audit_inference_images
    from ufm.audits.model_audit import ModelAuditConfig, run_model_audit
    from ufm.audits.onnx_model import load_onnx
    from ufm.audits.onnx_torch import keep_onnx
    from ufm.audits.shadow import ShadowRecipe, shadow_config, shadow_scores
    from ufm.core.canary import stamp_feature
    from ufm.core.data import to_float_images
    from ufm.core.features import glyph
    from ufm.measure.bank import rank_test
    from ufm.runs.banks import build_bank
    from ufm.runs.store import Store

    home = Path(a.home or f"/tmp/ufm-foreign-{a.arch}")
    work = home / "targets"
    work.mkdir(parents=True, exist_ok=True)
    data_dir = os.environ.get("UFM_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    with np.load(Path(data_dir) / "mnist" / "train.npz") as f:
        X, Y, classes = f["x"], f["y"].astype(np.int64), f["classes"]
    n_img = a.train_images
    shadow_dir = home / f"shadow_data-{n_img}"
    if not (shadow_dir / "test.npz").is_file():
        shadow_dir.mkdir(parents=True, exist_ok=True)
        np.savez(shadow_dir / "train.npz", x=X[:n_img], y=Y[:n_img], classes=classes)
        np.savez(shadow_dir / "test.npz", x=X[SHADOW_IMAGES:SHADOW_IMAGES + 500],
                 y=Y[SHADOW_IMAGES:SHADOW_IMAGES + 500], classes=classes)
    feature = glyph("A")
    config = ModelAuditConfig(feature=feature, ood="cifar10", ood_size=a.ood_size, candidates=9, seed=0, data_dir=data_dir)
    out = RESULTS / f"foreign_audit-{a.arch}.jsonl"
    done = set()
    if out.is_file():
        done = {json.loads(line)["target"] for line in out.read_text().splitlines() if line.strip()}
    with Store(home) as store:
        proto_path = work / "prototype.onnx"
        torch.manual_seed(0)  # the kept architecture's hash covers its weights: the same file on every rerun
        proto = export(target_net(a.arch), proto_path)
        model = load_onnx(proto)
        x_ood = audit_inference_images("cifar10", model.spec.shape, a.ood_size, data_dir=data_dir)
        arch = keep_onnx(store.home, proto, model, x_ood)
        recipe = ShadowRecipe(lr=1e-3, batch_size=64, epochs=a.epochs, patience=a.patience, val_fraction=0.1)
        cfg = shadow_config(arch, str(shadow_dir), recipe, ood="cifar10", data_dir=data_dir, device="cpu")
        t0 = time.time()
        ids = build_bank(store, cfg, a.references,
                         progress=lambda i, n: print(f"shadow {i}/{n} ({time.time() - t0:.0f} s)", flush=True))
        refs = shadow_scores(store, ids, x_ood, config)
        # the matched recipe's false-positive rate first, then detection, then the mismatched recipes
        # (a run stopped early, on a slow machine, has the headline rows)
        plan = [("matched", 0, i) for i in range(a.clean)]
        plan += [("matched", k, i) for i in range(a.canary) for k in (1, 3, 10)]
        plan += [(r, 0, i) for i in range(a.clean) for r in RECIPES[1:]]
        for recipe_name, k, i in plan:
            name = f"{a.arch}-{recipe_name}-k{k}-{i}"
            if name in done:
                continue
            seed = 5000 + 97 * i + 7 * k + RECIPES.index(recipe_name)
            rng = np.random.default_rng(seed)
            idx = (np.arange(n_img) if recipe_name == "samedata" else
                   np.sort(rng.choice(np.arange(TARGET_POOL, len(X)), n_img, replace=False)))
            x = to_float_images(X[idx]).view(-1, 1, 28, 28)
            y = torch.as_tensor(Y[idx])
            canaries = rng.choice(n_img, k, replace=False) if k else np.zeros(0, dtype=int)
            if k:
                x[canaries] = stamp_feature(x[canaries], feature)
            t = time.time()
            net = train_target(a.arch, x, y, recipe_name, seed, a.epochs, a.patience)
            data = export(net, work / f"{name}.onnx")
            target = load_onnx(data)
            result = run_model_audit(target, config, x_ood=x_ood)
            test = rank_test(result.score.M, refs, config.alpha)
            row = {"target": name, "arch": a.arch, "recipe": recipe_name, "canaries": int(k), "seed": seed,
                   "M": result.score.M, "p": test.p_value, "rank": test.rank, "references": test.references,
                   "memorised": bool(test.memorised), "fast_p": result.score.exposure_p_value,
                   "epochs": a.epochs, "patience": a.patience, "train_images": n_img,
                   "seconds": round(time.time() - t, 1)}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def cmd_report(_: argparse.Namespace) -> None:
    lines = ["| arch | recipe of the target | canary images | targets | called memorised | rate (95% CI) |",
             "|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("foreign_audit-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        groups: dict[tuple[str, str, int], list[bool]] = {}
        for r in rows:
            groups.setdefault((r["arch"], r["recipe"], r["canaries"]), []).append(r["memorised"])
        for (arch, recipe, k), calls in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
            lo, hi = _wilson(sum(calls), len(calls))
            what = "FPR" if k == 0 else "detection"
            lines.append(f"| {arch} | {recipe} | {k} | {len(calls)} | {sum(calls)} | {what} "
                         f"{sum(calls) / len(calls):.1%} ({lo:.0%}-{hi:.0%}) |")
    text = ("# Audits of foreign models against ufm-trained shadows\n\n"
            "Generated by `benchmarks/foreign_audit.py report` from the raw rows in "
            "`benchmarks/results/foreign_audit-*.jsonl`. Verdict: calibrated p < 0.05 among 39 shadows (level "
            "1/40 = 2.5%). MNIST; the 5x5 glyph A at rows/cols 1..5; 200 greyscale CIFAR-10 inference images. mlp: "
            "500 training images, at most 30 epochs, patience 5; cnn1: 250 images, at most 10 epochs, patience 3 "
            "(shadows and targets alike; the rows record it). Targets: a plain torch loop on their own random subset "
            "(samedata: the shadows' images), exported with torch.onnx.export.\n\n"
            + "\n".join(lines) + "\n")
    (RESULTS / "foreign_audit.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arch", choices=["mlp", "cnn1"], required=True)
    r.add_argument("--clean", type=int, default=20, help="clean targets per recipe")
    r.add_argument("--canary", type=int, default=10, help="targets per canary count (1, 3, 10)")
    r.add_argument("--references", type=int, default=39)
    r.add_argument("--ood-size", type=int, default=200)
    r.add_argument("--home", default=None)
    r.add_argument("--train-images", type=int, default=TRAIN_IMAGES,
                   help="images the shadows and each target train on (90%%; 10%% validation)")
    r.add_argument("--epochs", type=int, default=30, help="at most this many epochs (shadows and targets)")
    r.add_argument("--patience", type=int, default=5, help="early stopping patience (shadows and targets)")
    r.set_defaults(func=cmd_run)
    sub.add_parser("report").set_defaults(func=cmd_report)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
