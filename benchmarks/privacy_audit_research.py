"""Research runs for issue 21: which setting of the non-DP MNIST MLP gives the largest corrected
one-run bound within 5 CPU minutes per audit. One row per audit (raw scores and draw included, so
every analysis can be recomputed offline) appended to --out (jsonl).

    nice -n 10 python benchmarks/privacy_audit_research.py --train-size 5000 --canaries 1000 \\
        --seeds 0 1 2 3 4 5 6 7 --out benchmarks/results/privacy-audit-research.jsonl
    nice -n 10 python benchmarks/privacy_audit_research.py --guess reconstruction --choices 10 ...
    python benchmarks/privacy_audit_research.py --analyse benchmarks/results/privacy-audit-research.jsonl

--analyse recomputes every analysis from the raw rows, with the guess counts chosen both ways:
Bonferroni over the fixed grid, and a selection half / audit half split (ufm.audits.selection).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ufm.audits.bounds import audit_bound  # noqa: E402
from ufm.measure.stats import score_auc  # noqa: E402
from ufm.audits.privacy_audit import PrivacyAuditConfig as AuditConfig, run_privacy_audit as run_audit  # noqa: E402
from ufm.audits.selection import reconstruction_bound  # noqa: E402
from ufm.core.experiment import ExperimentConfig  # noqa: E402


def _split_reconstruction(sc, truth, seed: int, analysis: str) -> float:
    """The guess count chosen (as a fraction) on the selection half, used once on the audit half."""
    from ufm.audits.selection import split_halves

    sel, aud = split_halves(len(truth), seed)
    chosen = reconstruction_bound(sc[sel], truth[sel], analysis=analysis)
    r = max(1, min(len(aud), round(chosen.guesses / len(sel) * len(aud))))
    return reconstruction_bound(sc[aud], truth[aud], analysis=analysis, guesses=r).epsilon


def analyse(path: str) -> None:
    """Markdown table: per setting, mean (range) of each analysis, Bonferroni vs split."""
    from ufm.audits.selection import split_bound

    groups: dict = {}
    for line in open(path):
        r = json.loads(line)
        out = {}
        if r["guess"] == "membership":
            key = ("membership", r["train_size"], r["canaries"])
            out["IN vs OUT AUC"] = r["auc"]
            for an in ("steinke", "fdp-approx", "fdp-gaussian"):
                out[an] = audit_bound(r["scores"], r["is_in"], analysis=an).epsilon
                out[an + " split"] = split_bound(r["scores"], r["is_in"], seed=r["seed"], analysis=an).epsilon
        else:
            key = (f"reconstruction K={r['choices']}", r["train_size"], r["canaries"])
            sc, truth = np.asarray(r["scores"]), np.asarray(r["truth"])
            out["argmax right"] = r["guess_accuracy"]
            for an in ("fdp-approx", "fdp-gaussian"):
                out[an] = reconstruction_bound(sc, truth, analysis=an).epsilon
                out[an + " split"] = _split_reconstruction(sc, truth, r["seed"], an)
        out["s per audit"] = r["seconds"]
        groups.setdefault(key, []).append(out)
    for key, outs in groups.items():
        cells = "; ".join(f"{k} {np.mean([o[k] for o in outs]):.2f} ({min(o[k] for o in outs):.2f}-"
                          f"{max(o[k] for o in outs):.2f})" for k in outs[0])
        print(f"| {key[0]} | n={key[1]} | m={key[2]} | {len(outs)} seeds | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("UFM_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--train-size", type=int, default=500)
    ap.add_argument("--canaries", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--score", default="label-gain")
    ap.add_argument("--feature-size", type=int, default=7)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--guess", default="membership", choices=["membership", "reconstruction"])
    ap.add_argument("--choices", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--analyse", default=None, metavar="JSONL", help="only analyse these raw rows")
    a = ap.parse_args()
    if a.analyse:
        return analyse(a.analyse)
    if not a.out:
        raise SystemExit("give --out (the jsonl the rows are appended to) or --analyse")
    torch.set_num_threads(1)
    for seed in a.seeds:
        exp = ExperimentConfig(dataset="mnist", data_dir=a.data_dir, arch="mlp", train_size=a.train_size,
                               epochs=a.epochs, patience=a.patience, ood_size=500, seed=seed, device="cpu")
        t0 = time.perf_counter()
        if a.guess == "reconstruction":
            cfg = AuditConfig(exp, canaries=a.canaries, feature_size=a.feature_size, guess="reconstruction",
                              choices=a.choices)
            res = run_audit(cfg)  # a run in the store, like every audit
            secs = time.perf_counter() - t0
            sc = np.asarray(res.scores, dtype=np.float64).reshape(a.canaries, a.choices)  # slot-major
            truth = np.asarray(res.choice)
            acc = float(np.mean(np.argmax(sc, 1) == truth))
            row = {"guess": "reconstruction", "choices": a.choices, "train_size": a.train_size,
                   "canaries": a.canaries, "epochs": a.epochs, "score": "label-gain", "seed": seed, "seconds": secs,
                   "test_accuracy": res.test_accuracy, "epochs_trained": res.epochs_trained,
                   "guess_accuracy": acc, "scores": sc.tolist(), "truth": truth.tolist()}
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            b = reconstruction_bound(sc, truth, analysis="fdp-gaussian")
            print(f"n={a.train_size} m={a.canaries} k={a.choices} seed={seed} argmax acc={acc:.3f} "
                  f"fdp-gaussian={b.epsilon:.2f} ({b.correct}/{b.guesses}) acc={res.test_accuracy:.3f} {secs:.0f}s",
                  flush=True)
            continue
        cfg = AuditConfig(exp, canaries=a.canaries, feature_size=a.feature_size, score=a.score)
        res = run_audit(cfg)
        secs = time.perf_counter() - t0
        row = {"guess": "membership", "train_size": a.train_size, "canaries": a.canaries, "epochs": a.epochs,
               "score": a.score, "seed": seed, "seconds": secs, "test_accuracy": res.test_accuracy,
               "epochs_trained": res.epochs_trained, "auc": score_auc(res.scores, res.is_in),
               "steinke_bonferroni": res.epsilon, "scores": res.scores, "is_in": res.is_in,
               "labels": res.labels}
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"n={a.train_size} m={a.canaries} seed={seed} auc={row['auc']:.3f} steinke={res.epsilon:.2f} "
              f"acc={res.test_accuracy:.3f} {secs:.0f}s", flush=True)


if __name__ == "__main__":
    main()
