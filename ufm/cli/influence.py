"""CLI verbs for influence and explanations: ``ufm influence``, ``ufm sweep-canaries``, ``ufm explain``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ufm.fileio import atomic_write as write_atomic
from ufm.cli.common import (StderrProgress, add_experiment_args, add_home, check_out, check_out_dir, config_from_args,
                            open_store)


def cmd_influence(a: argparse.Namespace) -> int:
    from ufm.reports.run_report import to_csv
    from ufm.attribution.sweep import influence_scores

    check_out(a.out)
    cfg = config_from_args(a)
    infl = influence_scores(cfg, n_checkpoints=a.checkpoints, last_layer_only=a.last_layer,
                            progress=StderrProgress(a.quiet), store=open_store(a))  # the ranking model is a run
    table = infl.table()
    write_atomic(Path(a.out), to_csv(table), private=True)
    top, bottom = infl.top_bottom(min(a.show, len(table) // 2), min(a.show, len(table) // 2))
    print(f"self-influence of the {len(table)} images the ranking model trained on from {len(infl.checkpoint_steps)} checkpoints "
          f"(steps {infl.checkpoint_steps}) in {infl.seconds:.1f} s; wrote {a.out}")
    label = table.set_index("index")["label"]
    print("most self-influential (index:label): " + " ".join(f"{i}:{label[i]}" for i in top))
    print("least self-influential (index:label): " + " ".join(f"{i}:{label[i]}" for i in bottom))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from ufm.attribution.sweep import sweep_canaries
    from ufm.reports.run_report import export_names

    check_out_dir(a.out)
    cfg = config_from_args(a)
    store = open_store(a)
    res = sweep_canaries(cfg, a.out, store=store, top=a.top, bottom=a.bottom, n_checkpoints=a.checkpoints,
                         progress=StderrProgress(a.quiet))
    cols = ["index", "label", "group", "self_influence", "M", "p_value", "exposure_p_value", "verdict", "verdict_test", "significant"]
    print(export_names(res.table[cols]).to_string(index=False))
    print(res.summary())
    print(f"study {res.study!r} in {store.home}; wrote influence.csv, sweep.csv and sweep.json to {a.out}")
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from ufm.core.experiment import run_experiment
    from ufm.attribution.explain import explain_run, write_explanation_pngs

    check_out_dir(a.out)
    cfg = config_from_args(a)
    if cfg.canary.mode == "none":
        raise ValueError("explain needs a canary to show; drop --no-canary")
    res = run_experiment(cfg, progress=StderrProgress(a.quiet))
    exp = explain_run(res.model, cfg, res.canary_indices[0], n_ood=a.n_ood, target=a.target)
    files = write_explanation_pngs(exp, Path(a.out), scale=a.scale)
    summary = exp.summary()
    write_atomic(Path(a.out) / "explain.json", json.dumps(summary, indent=1), private=True)
    print(f"{exp.method}: share of attribution inside the feature box")
    print(f"  canary   without feature {summary['canary_share_clean']:.3f}   with {summary['canary_share_feature']:.3f}")
    print(f"  inference (mean of {a.n_ood}) clean {summary['ood_share_clean']:.3f}   with z_u {summary['ood_share_feature']:.3f}")
    print(f"wrote {len(files)} PNGs and explain.json to {a.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("influence", help="rank training images by TracIn self-influence",
                       description="Train a ranking model without canaries and score every training image.")
    add_experiment_args(p)
    p.add_argument("--checkpoints", type=int, default=10, help="TracIn checkpoints (paper: 10)")
    p.add_argument("--last-layer", action="store_true", help="gradients of the last layer only")
    p.add_argument("--show", type=int, default=10, help="how many top/bottom images to print")
    p.add_argument("--out", required=True, help="CSV: index, label, self_influence, rank")
    add_home(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_influence)

    p = sub.add_parser("sweep-canaries", help="one model per top/bottom self-influence canary; Pearson r",
                       description="Put the feature on the top-k and bottom-k self-influence images, one model "
                                   "each, and correlate self-influence with M. The sweep is a study in the run "
                                   "store (the dashboard's Influence page shows it); re-running resumes it, "
                                   "training only the canaries without a finished run.")
    add_experiment_args(p)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--bottom", type=int, default=15)
    p.add_argument("--checkpoints", type=int, default=10, help="TracIn checkpoints (paper: 10)")
    p.add_argument("--out", required=True, help="folder for influence.csv, sweep.csv, sweep.json")
    p.add_argument("--home", default=None, metavar="DIR",
                   help="ufm home holding the run store and the cached self-influence tables "
                        "(default $UFM_HOME, else the per-user data folder)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("explain", help="GradCAM overlays of the canary and inference images as PNGs",
                       description="Train with the canary, then write GradCAM (saliency for mlp) overlays.")
    add_experiment_args(p)
    p.add_argument("--n-ood", type=int, default=4, help="inference images to explain")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    p.add_argument("--scale", type=int, default=8, help="PNG upscaling factor")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_explain)
