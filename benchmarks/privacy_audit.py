"""Power and validity of the one-run privacy audit (ufm.audits.privacy_audit) on real data.

One audit model per regulariser setting, score and seed: an MLP on N MNIST training images (the
stratified seeded subset) with m distinct random binary features (each IN with probability 1/2),
scored on greyscale CIFAR-10 inference images by the canary-class gain or by M; the epsilon lower
bound at 95% (delta 1e-5, Bonferroni over the default (k+, k-) grid), the IN vs OUT AUC of the
scores, test accuracy and, for DP-SGD, the accountant's epsilon.

    nice python benchmarks/privacy_audit.py [--data-dir ../shared/data] [--train-size 500]
        [--canaries 100] [--feature-size 7] [--placement random] [--seeds 0 1 2] [--epochs 80]
        [--patience 10] [--dp-epochs 30] [--dp-lr 1e-2]
        [--settings none dropout dp4 dp1] [--scores label-gain M] [--out privacy_audit.json]

Prints a Markdown table (the README's) and writes every audit's result to --out.
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
from ufm.audits.privacy_audit import SCORES, PrivacyAuditConfig, run_privacy_audit  # noqa: E402
from ufm.runs.store import Store  # noqa: E402
from ufm.core.train import DPConfig  # noqa: E402

SETTINGS = {
    "none": dict(regularisers=()),
    "dropout": dict(regularisers=("dropout",)),
    "weight-decay": dict(regularisers=("weight-decay",)),
    "dp4": dict(regularisers=("dp-sgd",), dp=DPConfig(noise_multiplier=None, target_epsilon=4.0)),
    "dp1": dict(regularisers=("dp-sgd",), dp=DPConfig(noise_multiplier=None, target_epsilon=1.0)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("UFM_SHARED_DATA", "../shared/data"))
    ap.add_argument("--train-size", type=int, default=500)
    ap.add_argument("--canaries", type=int, default=100)
    ap.add_argument("--feature-size", type=int, default=7)
    ap.add_argument("--placement", default="random", choices=["fixed", "random"])
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--dp-epochs", type=int, default=30)
    ap.add_argument("--dp-lr", type=float, default=1e-2,
                    help="DP-SGD learning rate (1e-4 learns nothing under noise; 1e-3 for 15 epochs reached 31%% at eps 4)")
    ap.add_argument("--ood-size", type=int, default=500)
    ap.add_argument("--settings", nargs="+", default=["none", "dropout", "dp4", "dp1"], choices=list(SETTINGS))
    ap.add_argument("--out", default="privacy_audit.json")
    ap.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES),
                    help="audit scores to measure (each trains its own audit models: the score is fixed in advance)")
    ap.add_argument("--home", default=None,
                    help="ufm home whose run store trains the audit models (default: a new temporary one, so every "
                         "audit trains and its time is measured)")
    a = ap.parse_args()
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="ufm-privacy-bench-") if a.home is None else None
    store = Store(a.home if a.home is not None else tmp.name)
    rows, results = [], []
    for name in a.settings:
        kw = dict(SETTINGS[name])
        epochs = a.dp_epochs if "dp" in kw else a.epochs
        if "dp" in kw:
            kw["lr"] = a.dp_lr
        for score in a.scores:
            bounds, aucs, accs, claims, secs = [], [], [], [], []
            for seed in a.seeds:
                exp = ExperimentConfig(dataset="mnist", data_dir=a.data_dir, arch="mlp", train_size=a.train_size,
                                       epochs=epochs, patience=a.patience, ood_size=a.ood_size, seed=seed, device="cpu",
                                       **kw)
                cfg = PrivacyAuditConfig(exp, canaries=a.canaries, feature_size=a.feature_size, placement=a.placement,
                                         score=score)
                t0 = time.perf_counter()
                res = run_privacy_audit(cfg, store=store)
                secs.append(time.perf_counter() - t0)
                results.append({"setting": name, **res.to_dict()})
                bounds.append(res.epsilon)
                aucs.append(res.auc)
                accs.append(res.test_accuracy)
                claims.append(res.claimed_epsilon)
                b = res.bound
                print(f"{name} {score} seed {seed}: eps >= {b.epsilon:.3f} ({b.correct}/{b.guesses}, k+={b.k_plus}, "
                      f"k-={b.k_minus}) AUC {res.auc:.3f} acc {res.test_accuracy:.3f} claimed {res.claimed_epsilon} "
                      f"epochs {res.epochs_trained} {secs[-1]:.0f} s", flush=True)
            claim = "—" if claims[0] is None else f"{claims[0]:.3g}"
            rows.append(f"| {name} | {score} | {sum(bounds) / len(bounds):.2f} ({min(bounds):.2f}–{max(bounds):.2f}) | "
                        f"{sum(e > 0 for e in bounds)} of {len(bounds)} | {sum(aucs) / len(aucs):.2f} "
                        f"({min(aucs):.2f}–{max(aucs):.2f}) | {100 * sum(accs) / len(accs):.1f}% | {claim} | "
                        f"{min(secs):.0f}–{max(secs):.0f} |")
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"\nMLP, {a.train_size} MNIST training images (stratified, seeded), {a.canaries} canaries "
          f"({a.feature_size}x{a.feature_size} random binary features, placement {a.placement}), seeds {a.seeds}, "
          f"{a.epochs} epochs (DP-SGD {a.dp_epochs}, lr {a.dp_lr}), {a.ood_size} inference images")
    print("| regulariser | score | audited epsilon lower bound: mean (range) | seeds with a bound > 0 | "
          "IN vs OUT AUC: mean (range) | test accuracy | claimed epsilon | s per audit |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
