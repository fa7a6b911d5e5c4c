"""Power and validity of the one-run privacy audit (ufm.audits.privacy_audit) on real data.

One audit model per regulariser setting, score and seed: an MLP on N MNIST training images (the
stratified seeded subset) with m distinct random binary features (each IN with probability 1/2),
scored on greyscale CIFAR-10 inference images by the canary-class gain or by M; the epsilon lower
bound at 95% (delta 1e-5, Bonferroni over the default (k+, k-) grid), the IN vs OUT AUC of the
scores, test accuracy and, for DP-SGD, the accountant's epsilon.

    nice python benchmarks/privacy_audit.py [--data-dir ../shared/data] [--train-size 500]
        [--canaries 100] [--feature-size 7] [--placement random] [--seeds 0 1 2] [--epochs 80]
        [--patience 10] [--dp-epochs 30] [--dp-lr 1e-2]
        [--settings none dropout dp4 dp1] [--modes membership:label-gain reconstruction:10]
        [--out benchmarks/results/privacy-audit.jsonl]

Every analysis that applies is reported side by side (membership: Steinke, f-DP approx-dp curve,
f-DP Gaussian curve; reconstruction: the two f-DP ones). Prints a Markdown table (the README's) and
appends every audit's result, raw scores included, to --out (jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ufm.core.experiment import ExperimentConfig  # noqa: E402
from ufm.audits.privacy_audit import PrivacyAuditConfig, run_privacy_audit  # noqa: E402
from ufm.runs.store import Store  # noqa: E402
from ufm.core.train import DPConfig  # noqa: E402

SETTINGS = {
    "none": dict(regularisers=()),
    "dropout": dict(regularisers=("dropout",)),
    "weight-decay": dict(regularisers=("weight-decay",)),
    "dp4": dict(regularisers=("dp-sgd",), dp=DPConfig(noise_multiplier=None, target_epsilon=4.0)),
    "dp1": dict(regularisers=("dp-sgd",), dp=DPConfig(noise_multiplier=None, target_epsilon=1.0)),
}


def _mode(text: str) -> dict:
    """``membership:label-gain``, ``membership:M`` or ``reconstruction:K`` as PrivacyAuditConfig fields."""
    guess, _, arg = text.partition(":")
    if guess == "membership":
        return dict(guess="membership", score=arg or "label-gain")
    if guess == "reconstruction":
        return dict(guess="reconstruction", choices=int(arg or 10))
    raise SystemExit(f"unknown audit mode {text!r}: membership:label-gain, membership:M or reconstruction:K")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("UFM_SHARED_DATA", "../shared/data"))
    ap.add_argument("--train-size", type=int, default=500)
    ap.add_argument("--canaries", type=int, default=100)
    ap.add_argument("--feature-size", type=int, default=7)
    ap.add_argument("--placement", default="random", choices=["fixed", "random"])
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--dp-epochs", type=int, default=30)
    ap.add_argument("--dp-lr", type=float, default=1e-2,
                    help="DP-SGD learning rate (1e-4 learns nothing under noise; 1e-3 for 15 epochs reached 31%% at eps 4)")
    ap.add_argument("--ood-size", type=int, default=500)
    ap.add_argument("--settings", nargs="+", default=["none", "dropout", "dp4", "dp1"], choices=list(SETTINGS))
    ap.add_argument("--modes", nargs="+", default=["membership:label-gain", "reconstruction:10"],
                    help="audits to measure, each trains its own models: membership:label-gain, membership:M, "
                         "reconstruction:K")
    ap.add_argument("--out", default="privacy-audit.jsonl", help="raw rows, one audit per line (appended)")
    ap.add_argument("--home", default=None,
                    help="ufm home whose run store trains the audit models (default: a new temporary one, so every "
                         "audit trains and its time is measured)")
    a = ap.parse_args()
    import tempfile

    import torch

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="ufm-privacy-bench-") if a.home is None else None
    store = Store(a.home if a.home is not None else tmp.name)
    rows = []
    for name in a.settings:
        kw = dict(SETTINGS[name])
        epochs = a.dp_epochs if "dp" in kw else a.epochs
        if "dp" in kw:
            kw["lr"] = a.dp_lr
        for mode in a.modes:
            got: dict[str, list[float]] = {}
            secs, claims, accs = [], [], []
            for seed in a.seeds:
                exp = ExperimentConfig(dataset="mnist", data_dir=a.data_dir, arch="mlp", train_size=a.train_size,
                                       epochs=epochs, patience=a.patience, ood_size=a.ood_size, seed=seed, device="cpu",
                                       **kw)
                cfg = PrivacyAuditConfig(exp, canaries=a.canaries, feature_size=a.feature_size, placement=a.placement,
                                         **_mode(mode))
                t0 = time.perf_counter()
                res = run_privacy_audit(cfg, store=store)
                secs.append(time.perf_counter() - t0)
                claims.append(res.claimed_epsilon)
                accs.append(res.test_accuracy)
                for an, b in res.bounds.items():
                    got.setdefault(an, []).append(b.epsilon)
                with open(a.out, "a") as fh:
                    fh.write(json.dumps({"setting": name, "mode": mode, "seconds": secs[-1], **res.to_dict()}) + "\n")
                print(f"{name} {mode} seed {seed}: " + ", ".join(f"{an} {b.epsilon:.2f} ({b.correct}/{b.guesses})"
                                                                 for an, b in res.bounds.items())
                      + f" acc {res.test_accuracy:.3f} claimed {res.claimed_epsilon} {secs[-1]:.0f} s", flush=True)
            claim = "—" if claims[0] is None else f"{claims[0]:.3g}"
            for an, eps in got.items():
                rows.append(f"| {name} | {mode} | {an} | {sum(eps) / len(eps):.2f} ({min(eps):.2f}–{max(eps):.2f}) | "
                            f"{sum(e > 0 for e in eps)} of {len(eps)} | {100 * sum(accs) / len(accs):.1f}% | {claim} | "
                            f"{sum(secs) / len(secs):.0f} |")
    print(f"\nMLP, {a.train_size} MNIST training images (stratified, seeded), {a.canaries} canaries or slots "
          f"({a.feature_size}x{a.feature_size} random binary features, placement {a.placement}), seeds {a.seeds}, "
          f"{a.epochs} epochs (DP-SGD {a.dp_epochs}, lr {a.dp_lr}), {a.ood_size} inference images; 95%, delta 1e-5, "
          "Bonferroni over the guess-count grid")
    print("| regulariser | audit | analysis | epsilon lower bound: mean (range) | seeds > 0 | test accuracy | "
          "claimed epsilon | s per audit |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
