"""Calibration study: how often does each test call a feature "memorised" on models that never saw it?

A clean model (no canary) does not depend on the feature, so one set of clean models scores many
features. For every (model, feature) pair this records the decision of

* the **reference test** (the verdict: the model's M among R clean reference models of the same
  training setting, :mod:`ufm.measure.bank`), with the product's own bank of reference seeds,
* the **fast exposure test** with each candidate family that applies to the feature's kind,
* the paper's **t-tests** (Welch and paired), and
* the **access settings** (white-, grey-, black-box confidence gain): rank p-values beside the paper's.

``power`` trains canary models (the feature on 1, 3, 10, 30, 100 random training images; one canary
over 10 different canary images) and reports how often both tests detect it.

Every training is a run of the store (``--home``) through an executor, so an interrupted study resumes
and the bank is exactly what the dashboard would train. Usage (``report`` merges the parts)::

    python benchmarks/calibration.py clean --arch mlp --models 50 --train-size 2000 --ood-size 200 --per-class 20
    python benchmarks/calibration.py clean --arch cnn1 --models 20 --train-size 500 --ood-size 50 \
        --candidates 49 --per-class 5 --epochs 15 --patience 3 --families default --access one-per-kind \
        --home /tmp/ufm-calibration-cnn1
    python benchmarks/calibration.py power --arch mlp --train-size 2000 --ood-size 200
    python benchmarks/calibration.py report            # Markdown tables + ufm/calibration.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCORE_SEED = 0
ALPHA = 0.05


def features():
    """The study's features: 5 glyphs, 3 typed texts, 2 drawn patterns, 1 uploaded image (all fit 28x28)."""
    from PIL import Image, ImageDraw

    from ufm.core.features import glyph, grid_feature, image_feature, text_feature

    smile = ["011110", "100001", "101101", "100001", "101101", "010010"]
    zigzag = ["1000001", "0100010", "0010100", "0001000", "0010100", "0100010", "1111111"]
    logo = Image.new("L", (64, 64), 0)
    d = ImageDraw.Draw(logo)
    d.ellipse((6, 6, 58, 58), outline=255, width=10)
    d.rectangle((28, 14, 36, 50), fill=255)
    buf = io.BytesIO()
    logo.save(buf, format="PNG")
    return [glyph("A"), glyph("X"), glyph("plus"), glyph("T"), glyph("L"),
            text_feature("DOE", 7), text_feature("JD", 7), text_feature("ID42", 6),
            grid_feature([[int(c) for c in r] for r in smile], name="drawn smile"),
            grid_feature([[int(c) for c in r] for r in zigzag], name="drawn zigzag"),
            image_feature(buf.getvalue(), 7, threshold=0.5, name="uploaded logo")]


def families(feature) -> list[str]:
    """Candidate families tried for a feature's kind (the first is the product's default)."""
    from ufm.measure.candidates import default_family

    by_kind = {"glyph": ["strokes", "permute", "shift"], "drawn": ["strokes", "permute", "shift"],
               "text": ["strings", "permute"], "image": ["permute", "shift"]}
    fams = by_kind[feature.kind]
    first = default_family(feature)
    return [first] + [f for f in fams if f != first]


def base_config(a, arch: str):
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import glyph

    return ExperimentConfig(feature=glyph("A"), dataset="mnist", data_dir=a.data_dir, arch=arch,
                            canary=CanaryChoice("none", ()), train_size=a.train_size, epochs=a.epochs,
                            patience=a.patience, ood_size=a.ood_size, candidates=a.candidates, device="cpu")


def held_out(a, per_class: int):
    """Up to ``per_class`` test images of each class (the access settings' held-out data)."""
    import torch

    from ufm.core.data import load_split

    test = load_split("mnist", "test", data_dir=a.data_dir)
    keep = torch.cat([torch.nonzero(test.y == c).flatten()[:per_class] for c in range(test.num_classes)])
    return test.x[keep], test.y[keep]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_models(store, configs, executor=None) -> list[str]:
    """Run ids of ``configs``, runs through ``executor`` (default: inline, one by one); identical ones reused."""
    from ufm.runs.engine import InlineExecutor, wait_for

    if executor is not None:
        ids = [executor.submit(cfg) for cfg in configs]
        return [r.id for r in wait_for(executor, ids, progress=lambda p: log(p.message))]
    inline, ids = InlineExecutor(store), []
    for i, cfg in enumerate(configs):
        t0, cached = time.perf_counter(), store.find_cached(cfg) is not None
        ids.append(inline.submit(cfg))
        log(f"model {i + 1}/{len(configs)} seed {cfg.seed}: {'cached' if cached else f'{time.perf_counter() - t0:.1f} s'}")
    return ids


def bank_effects(store, bank_ids, x_ood, feats) -> dict[str, list[float]]:
    """M (nats) of each feature on each reference model of the bank: feature name -> (R,) list."""
    from ufm.measure.scores import feature_effect

    bank_m = {f.name: [] for f in feats}
    for run_id in bank_ids:
        model = store.load_model(run_id)
        for f in feats:
            d_u, d_r = feature_effect(model, x_ood, f, seed=SCORE_SEED)
            bank_m[f.name].append(float(d_u.mean() - d_r.mean()))
    return bank_m


def clean(a) -> None:
    """Clean models: every test's decision on every feature."""
    from ufm.core.experiment import inference_images
    from ufm.measure.bank import bank_config, bank_configs, rank_test
    from ufm.measure.access import access_scores
    from ufm.measure.scores import feature_effect, memorisation_score
    from ufm.runs.store import Store

    store = Store(a.home)
    base = base_config(a, a.arch)
    feats = features()
    log(f"{a.arch}: training {a.models} clean test models and a bank of {a.references} reference models")
    test_ids = train_models(store, [bank_config(base, s) for s in range(a.models)])
    bank_ids = train_models(store, bank_configs(base, a.references))
    x_ood = inference_images(base).x
    x_test, y_test = held_out(a, a.per_class)
    label = 5  # the class of MNIST training image 0, the paper's canary
    # The access settings cost K forward passes of the held-out images per feature: on a slow
    # architecture they are measured on one feature of each kind (--access all: every feature).
    firsts = {}
    for f in feats:
        firsts.setdefault(f.kind, f.name)
    access_names = {f.name for f in feats} if a.access == "all" else set(firsts.values())

    bank_m = bank_effects(store, bank_ids, x_ood, feats)
    rows = []
    for i, run_id in enumerate(test_ids):
        t0 = time.perf_counter()
        model = store.load_model(run_id)
        rec = store.get(run_id)
        for f in feats:
            row = {"arch": a.arch, "model": i, "run_id": run_id, "feature": f.name, "kind": f.kind,
                   "test_accuracy": rec.summary["test_accuracy"]}
            fams = families(f) if a.families == "all" else families(f)[:1]
            for k, fam in enumerate(fams):
                s = memorisation_score(model, x_ood, f, candidates=a.candidates, family=fam, seed=SCORE_SEED)
                row[f"fast_{fam}_status"] = s.status
                row[f"fast_{fam}_p"] = s.exposure_p_value
                if k == 0:
                    row.update(M=s.M, welch_p=s.p_value, paired_p=s.p_value_paired, family=fam)
            d_u, d_r = feature_effect(model, x_ood, f, seed=SCORE_SEED)
            assert float(d_u.mean() - d_r.mean()) == row["M"], "feature_effect and memorisation_score disagree"
            ref = rank_test(row["M"], np.asarray(bank_m[f.name]), ALPHA)
            row.update(reference_p=ref.p_value, reference_memorised=ref.memorised)
            if f.name in access_names:
                acc = access_scores(model, f, x_test=x_test, y_test=y_test, x_ood=x_ood, canary_label=label,
                                    candidates=a.candidates, seed=SCORE_SEED)
                for name in ("white_box", "grey_box", "black_box_gain"):
                    g = getattr(acc, name)
                    row[f"{name}_p"] = g.p_value
                    row[f"{name}_p_paper"] = g.p_value_paper
            rows.append(row)
        log(f"scored model {i + 1}/{len(test_ids)} in {time.perf_counter() - t0:.1f} s")
    write(f"calibration-clean-{a.arch}.json", {"settings": settings(a), "bank": bank_ids, "rows": rows})


def power(a) -> None:
    """Canary models: detection rate against canary frequency, reference and fast test on the same models."""
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import inference_images
    from ufm.core.features import glyph
    from ufm.measure.bank import bank_configs, rank_test, reference_scores
    from ufm.measure.scores import memorisation_score
    from ufm.runs.store import Store

    store = Store(a.home)
    feature = glyph("A")
    base = base_config(a, a.arch).replace(feature=feature)
    plan = [(1, s) for s in range(10)] + [(c, s) for c in (3, 10, 30, 100) for s in range(5)]
    configs = [base.replace(canary=CanaryChoice("random", (), count=c), seed=s) for c, s in plan]
    ids = train_models(store, configs)
    bank_ids = train_models(store, bank_configs(base, a.references))
    x_ood = inference_images(base).x
    scoring = base.replace(seed=SCORE_SEED)  # reference_scores scores with config.seed
    refs = reference_scores(store, scoring, bank_ids)
    rows = []
    for (c, s), run_id in zip(plan, ids):
        model = store.load_model(run_id)
        row = {"arch": a.arch, "canaries": c, "seed": s, "run_id": run_id,
               "canary_indices": store.get(run_id).summary["canary_indices"]}
        for k, fam in enumerate(families(feature)):
            fast = memorisation_score(model, x_ood, feature, candidates=a.candidates, family=fam, seed=SCORE_SEED)
            row[f"fast_{fam}_status"], row[f"fast_{fam}_p"] = fast.status, fast.exposure_p_value
            if k == 0:
                row.update(M=fast.M, family=fam, welch_p=fast.p_value)
        ref = rank_test(row["M"], refs, ALPHA)
        row.update(reference_p=ref.p_value, reference_memorised=ref.memorised)
        rows.append(row)
        log(f"{c} canaries seed {s}: M = {row['M']:.4g} reference p = {ref.p_value:.3g}")
    write(f"calibration-power-{a.arch}.json", {"settings": settings(a), "bank": bank_ids, "rows": rows})


def extend(a) -> None:
    """Grow the bank of a finished ``clean`` part to ``--references`` models (re-deciding the reference
    test of every row) and add candidate families (``--add-families``) to its fast test."""
    from ufm.core.experiment import inference_images
    from ufm.measure.bank import bank_configs, rank_test
    from ufm.measure.scores import memorisation_score
    from ufm.runs.store import Store

    path = RESULTS / f"calibration-clean-{a.arch}.json"
    d = json.loads(path.read_text())
    st = d["settings"]
    for k in ("train_size", "epochs", "patience", "ood_size", "data_dir"):
        setattr(a, k, st[k])
    store = Store(a.home)
    base = base_config(a, a.arch)
    feats = {f.name: f for f in features()}
    bank_ids = train_models(store, bank_configs(base, a.references))
    x_ood = inference_images(base).x
    bank_m = bank_effects(store, bank_ids, x_ood, list(feats.values()))
    add = [f for f in (a.add_families or "").split(",") if f]
    models = {}
    for row in d["rows"]:
        ref = rank_test(row["M"], np.asarray(bank_m[row["feature"]]), ALPHA)
        row.update(reference_p=ref.p_value, reference_memorised=ref.memorised)
        f = feats[row["feature"]]
        for fam in add:
            if fam not in families(f) or f"fast_{fam}_status" in row:
                continue
            model = models.get(row["run_id"]) or models.setdefault(row["run_id"], store.load_model(row["run_id"]))
            s = memorisation_score(model, x_ood, f, candidates=st["candidates"], family=fam, seed=SCORE_SEED)
            row[f"fast_{fam}_status"], row[f"fast_{fam}_p"] = s.status, s.exposure_p_value
    d["settings"]["references"] = a.references
    d["bank"] = bank_ids
    write(path.name, d)


def settings(a) -> dict:
    import torch

    from ufm.version import __version__
    return {k: v for k, v in vars(a).items() if k not in ("func",)} | {
        "ufm": __version__, "torch": torch.__version__, "score_seed": SCORE_SEED, "alpha": ALPHA,
        "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def write(name: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(payload, indent=1, default=float))
    log(f"wrote {RESULTS / name}")


# ----------------------------------------------------------------------------------------- report

def wilson(k: int, n: int) -> tuple[float, float, float]:
    from ufm.measure.stats import wilson_interval

    if n == 0:
        return float("nan"), float("nan"), float("nan")
    return (k / n, *wilson_interval(k, n))


def _rate(calls) -> str:
    k, n = int(np.sum(calls)), len(calls)
    r, lo, hi = wilson(k, n)
    return f"{k}/{n} = {r:.1%} [{lo:.1%}, {hi:.1%}]"


def _default(g) -> str:
    """The product's current default family for these rows' kind (ufm.measure.candidates.DEFAULT_FAMILY)."""
    from ufm.measure.candidates import DEFAULT_FAMILY

    fam = DEFAULT_FAMILY[g["kind"].iloc[0]]
    col = f"fast_{fam}_status"
    return fam if col in g.columns and g[col].notna().all() else g["family"].iloc[0]


def report(a) -> None:
    import pandas as pd

    clean_frames, power_frames, cal_rows, meta = [], [], [], {}
    for p in sorted(RESULTS.glob("calibration-clean-*.json")):
        d = json.loads(p.read_text())
        clean_frames.append(pd.DataFrame(d["rows"]))
        meta[d["settings"]["arch"]] = d["settings"]
    for p in sorted(RESULTS.glob("calibration-power-*.json")):
        power_frames.append(pd.DataFrame(json.loads(p.read_text())["rows"]))
    out = []
    if clean_frames:
        df = pd.concat(clean_frames, ignore_index=True)
        out.append("### Clean models: share called memorised (95% Wilson interval)\n")
        for arch, s in meta.items():
            out.append(f"- {arch}: {s['models']} clean models + {s['references']} reference models, "
                       f"{s['train_size']} MNIST training images, {s['ood_size']} inference images, "
                       f"K = {s['candidates']} candidates, {s['per_class']} held-out images per class.")
        out.append("")
        out.append("| arch | kind | features | verdict (reference test) | fast test, default family | t-test (Welch) | paired t-test |")
        out.append("|---|---|---|---|---|---|---|")
        for (arch, kind), g in df.groupby(["arch", "kind"], sort=False):
            fam = _default(g)
            out.append(f"| {arch} | {kind} | {g['feature'].nunique()} | {_rate(g['reference_memorised'])} | "
                       f"{fam}: {_rate(g[f'fast_{fam}_status'] == 'memorised')} | {_rate(g['welch_p'] < ALPHA)} | "
                       f"{_rate(g['paired_p'] < ALPHA)} |")
        out.append("\n### Fast test by candidate family (clean models; inconclusive counts as not memorised)\n")
        out.append("| arch | kind | family | called memorised | inconclusive |")
        out.append("|---|---|---|---|---|")
        for (arch, kind), g in df.groupby(["arch", "kind"], sort=False):
            for col in [c for c in g.columns if c.startswith("fast_") and c.endswith("_status")]:
                fam = col[len("fast_"):-len("_status")]
                st = g[col].dropna()
                if st.empty:
                    continue
                calls = st == "memorised"
                out.append(f"| {arch} | {kind} | {fam} | {_rate(calls)} | {int((st == 'inconclusive').sum())} |")
                r, lo, hi = wilson(int(calls.sum()), len(calls))
                cal_rows.append({"kind": kind, "family": fam, "arch": arch, "rate": r, "low": lo, "high": hi,
                                 "calls": int(calls.sum()), "tests": int(len(calls)),
                                 "models": int(g["model"].nunique()), "alpha": ALPHA})
        out.append("\n### Per feature (clean models): verdict and fast test (default family)\n")
        out.append("| arch | feature | verdict (reference) | fast test (default family) | Welch t-test |")
        out.append("|---|---|---|---|---|")
        for (arch, feat), g in df.groupby(["arch", "feature"], sort=False):
            fam = _default(g)
            out.append(f"| {arch} | {feat} | {_rate(g['reference_memorised'])} | {_rate(g[f'fast_{fam}_status'] == 'memorised')} | "
                       f"{_rate(g['welch_p'] < ALPHA)} |")
        out.append("\n### Access settings on clean models: calibrated rank p vs the paper's t-test\n")
        out.append("| arch | setting | calibrated (rank among candidates) | paper's t-test |")
        out.append("|---|---|---|---|")
        for arch, g in df.groupby("arch", sort=False):
            for name in ("white_box", "grey_box", "black_box_gain"):
                h = g.dropna(subset=[f"{name}_p_paper"])
                out.append(f"| {arch} | {name} | {_rate(h[f'{name}_p'] < ALPHA)} | {_rate(h[f'{name}_p_paper'] < ALPHA)} |")
    if power_frames:
        df = pd.concat(power_frames, ignore_index=True)
        out.append("\n### Power: glyph A on random canaries (detection rate)\n")
        fams = [c[len("fast_"):-len("_status")] for c in df.columns if c.startswith("fast_") and c.endswith("_status")]
        out.append("| arch | canaries | models | verdict (reference test) | " + " | ".join(f"fast test, {f}" for f in fams)
                   + " | mean M (nats) |")
        out.append("|---|---|---|---|" + "---|" * len(fams) + "---|")
        for (arch, c), g in df.groupby(["arch", "canaries"]):
            out.append(f"| {arch} | {c} | {len(g)} | {_rate(g['reference_memorised'])} | "
                       + " | ".join(_rate(g[f"fast_{f}_status"] == "memorised") for f in fams)
                       + f" | {g['M'].mean():.4f} |")
    text = "\n".join(out) + "\n"
    (RESULTS / "calibration.md").write_text(text)
    print(text)
    if cal_rows:
        (ROOT / "ufm" / "calibration.json").write_text(json.dumps({
            "source": "benchmarks/calibration.py (see benchmarks/results/calibration.md)",
            "fast_test": cal_rows}, indent=1))
        log("wrote ufm/calibration.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["clean", "power", "extend", "report"])
    ap.add_argument("--arch", default="mlp", choices=["mlp", "cnn1"])
    ap.add_argument("--models", type=int, default=50, help="clean test models")
    ap.add_argument("--references", type=int, default=39, help="R reference models (the product's default)")
    ap.add_argument("--add-families", default="", help="extend: comma-separated candidate families to add")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--ood-size", type=int, default=300)
    ap.add_argument("--candidates", type=int, default=99)
    ap.add_argument("--per-class", type=int, default=30, help="held-out images per class for the access settings")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--families", default="all", choices=["all", "default"],
                    help="fast test with every candidate family of a kind, or only the default one")
    ap.add_argument("--access", default="all", choices=["all", "one-per-kind"],
                    help="access settings on every feature, or on the first feature of each kind")
    ap.add_argument("--home", default=os.environ.get("UFM_CALIBRATION_HOME", "/tmp/ufm-calibration"))
    ap.add_argument("--data-dir", default=os.environ.get("UFM_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    {"clean": clean, "power": power, "extend": extend, "report": report}[a.part](a)


if __name__ == "__main__":
    main()
