"""Memorisation map: how often the calibrated verdict detects ONE canary, setting by setting.

For every setting (architecture, dataset, training-set size, budget, device) it trains, through
the run store and exactly as the dashboard would:

* the setting's TracIn ranking model (:func:`ufm.attribution.sweep.cached_influence`), to find its most and
  least self-influential training images;
* the bank of R = 39 clean reference models (:func:`ufm.measure.bank.bank_configs`);
* canary models: the feature on ONE training image (top / random / bottom self-influence), glyph
  and typed name, one model per seed; plus, for the clinical ladder, the name on 3 and 10 images;

and records, per canary model, M and the calibrated verdict (rank among the bank). Rows are
appended to a JSON-lines file as each setting completes; the store caches every finished model,
so an interrupted run resumes where it stopped. ``table`` turns the rows into the shipped map
(``ufm/memorisation_map.json``), a Markdown table and the heat-map picture.

Usage::

    python benchmarks/memorisation_map.py run --grid cpu --workers 2          # this machine's rows
    python benchmarks/memorisation_map.py run --grid gpu --device cuda --workers 12
    python benchmarks/memorisation_map.py table                               # json + md + png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ufm.measure.memorisation_map import (CLINICAL, FEATURE_KINDS, LADDER_CLASS, MAP_FILE, PLACEMENTS,  # noqa: E402
                                  TEACHING, MapCell, Setting)

RESULTS = ROOT / "benchmarks" / "results"
REFERENCES = 39
DEMO_SEEDS = 10

S = Setting
# The demos' CPU settings (ufm.measure.memorisation_map.TEACHING, CLINICAL) are measured first.
# Cells a demo can use get DEMO_SEEDS seeds in every setting, so any setting can become a demo's:
# the teaching demo's typical and atypical canaries (MNIST) and the clinical ladder (chest X-rays).
TEACHING_CELLS = [("top", "glyph", 1), ("bottom", "glyph", 1)]
# One patient's X-rays share a diagnosis: the ladder puts the name on k images of one class (pneumonia).
# The same counts on random X-rays (mixed classes) are measured too, for the contrast.
LADDER_CELLS = [("random", "name", 1), ("random", "name", 3), ("random", "name", 10),
                ("class", "name", 1), ("class", "name", 3), ("class", "name", 10)]


def _cost(s: Setting) -> float:
    """A rough order of cost, so that cheap settings finish (and are written) first."""
    return s.train_size * (3 if s.budget == "long" else 1) * (8 if s.arch == "cnn1" else 1) * (
        5 if s.dataset == "chest-xray" else 1)


def _grid(arches, datasets, sizes, budgets, device, first=()):
    out = []
    for arch in arches:
        for ds in datasets:
            for n in sizes:
                if ds == "chest-xray" and n > 2000:
                    continue  # 2,682 training X-rays in all
                for b in budgets:
                    out.append(S(arch, ds, n, b, device))
    return list(first) + sorted((s for s in out if s not in first), key=_cost)


GRIDS = {
    "demo": [TEACHING, CLINICAL],
    "cpu": _grid(["mlp"], ["mnist", "chest-xray"], [500, 2000], ["quick", "long"], "cpu", first=(TEACHING, CLINICAL))
    + [S("mlp", "chest-xray", 200, "quick")],  # fewer X-rays: is each one memorised more?
    # On a GPU: the CNN everywhere, and the MLP where a CPU would take hours (10,000 images).
    "gpu": _grid(["cnn1"], ["mnist", "chest-xray"], [500, 2000, 10000], ["quick", "long"], "cuda")
    + _grid(["mlp"], ["mnist"], [10000], ["quick", "long"], "cuda"),
}


def cells(setting: Setting, seeds: int) -> list[tuple[str, str, int, int]]:
    """(placement, feature, count, seeds) of every cell measured in ``setting``."""
    demo = TEACHING_CELLS if setting.dataset == "mnist" else LADDER_CELLS
    out = [(p, f, 1, DEMO_SEEDS if (p, f, 1) in demo else seeds) for p in PLACEMENTS for f in FEATURE_KINDS]
    out += [(p, f, c, DEMO_SEEDS) for p, f, c in demo if c > 1 or p not in PLACEMENTS]
    return out


# ----------------------------------------------------------------------------------------- workers

_STORE = None


def _init(home: str) -> None:
    import torch

    global _STORE
    torch.set_num_threads(1)  # one core per worker: OpenMP threads spin-wait beside each other
    from ufm.runs.store import Store

    _STORE = Store(home)


def _train(config_json: str) -> dict:
    """Train (or reuse) one config in a worker; its M and cost."""
    from ufm.core.experiment import ExperimentConfig
    from ufm.runs.engine import InlineExecutor

    cfg = ExperimentConfig.from_json(config_json)
    t0 = time.perf_counter()
    cached = _STORE.find_cached(cfg) is not None
    run_id = InlineExecutor(_STORE).submit(cfg)  # a run of the store, in this worker's thread
    res = _STORE.load_result(run_id)
    return {"key": cfg.key(), "run_id": run_id, "M": res.M, "test_accuracy": res.test_accuracy, "learned": res.learned,
            "epochs_trained": res.epochs_trained, "seconds": res.train_seconds + res.score_seconds,
            "wall": time.perf_counter() - t0, "cached": cached, "canary_indices": list(res.canary_indices),
            "load": os.getloadavg()[0]}


def _ranking(args: tuple[str, str]) -> tuple[str, int, int, float]:
    """(setting json, top index, bottom index, seconds) from the setting's TracIn ranking model."""
    home, setting_json = args
    from ufm.attribution.sweep import cached_influence

    setting = Setting(**json.loads(setting_json))
    t0 = time.perf_counter()
    table = cached_influence(home, setting.config(setting.feature("glyph")))
    order = table.sort_values("rank")["index"].astype(int).tolist()
    return setting_json, order[0], order[-1], time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- run

def _jobs(setting: Setting, top: int, bottom: int, seeds: int):
    """(bank configs, [(cell, seed, config)]) of one setting."""
    from ufm.core.canary import CanaryChoice
    from ufm.measure.bank import bank_configs

    base = setting.config(setting.feature("glyph"))
    bank = bank_configs(base, REFERENCES)
    canaries = []
    for placement, feature, count, n in cells(setting, seeds):
        for seed in range(n):
            if placement == "random":
                choice = CanaryChoice("random", (), count=count)
            elif placement == "class":
                choice = CanaryChoice("class", (), count=count, label=LADDER_CLASS)
            else:
                choice = CanaryChoice("index", (top if placement == "top" else bottom,))
            cfg = setting.config(setting.feature(feature), canary=choice, seed=seed)
            canaries.append(((placement, feature, count), seed, cfg))
    return bank, canaries


def _done_keys(rows_path: Path) -> set[str]:
    if not rows_path.exists():
        return set()
    return {json.loads(line)["config_key"] for line in rows_path.read_text().splitlines() if line.strip()}


def run(args: argparse.Namespace) -> None:
    import torch

    from ufm.runs.store import Store

    torch.set_num_threads(1)  # scoring the bank here, beside the workers: spin-waiting threads would starve

    settings = [s if s.device == args.device else Setting(s.arch, s.dataset, s.train_size, s.budget, args.device)
                for s in GRIDS[args.grid]]
    if args.only:
        settings = [s for s in settings if args.only in s.label]
    rows_path = Path(args.rows or RESULTS / f"memorisation-map-{args.device}.jsonl")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_keys(rows_path)
    home = args.home
    store = Store(home)
    ctx = mp.get_context("spawn")
    t_start = time.perf_counter()
    with ctx.Pool(args.workers, initializer=_init, initargs=(home,)) as pool:
        ranks = {}
        for sj, top, bottom, sec in pool.imap_unordered(_ranking, [(home, json.dumps(s.__dict__)) for s in settings]):
            ranks[sj] = (top, bottom, sec)
            log(f"ranking {Setting(**json.loads(sj)).label}: top image {top}, bottom image {bottom} ({sec:.1f} s)")
        plan = []
        for s in settings:
            top, bottom, _ = ranks[json.dumps(s.__dict__)]
            bank, canaries = _jobs(s, top, bottom, args.seeds)
            todo = [c for c in canaries if c[2].key() not in done]
            if todo:
                plan.append((s, bank, todo))
        # One flat queue, setting by setting (bank first), so the first settings finish first.
        flat = [(i, cfg) for i, (_, bank, todo) in enumerate(plan) for cfg in list(bank) + [c[2] for c in todo]]
        left = {i: len(bank) + len(todo) for i, (_, bank, todo) in enumerate(plan)}
        out: dict[str, dict] = {}
        index_of = {}
        for i, cfg in flat:
            index_of.setdefault(cfg.key(), []).append(i)
        log(f"{len(flat)} trainings in {len(plan)} settings, {args.workers} workers on {args.device}")
        for r in pool.imap_unordered(_train, [cfg.to_json() for _, cfg in flat]):
            out[r["key"]] = r
            for i in index_of[r["key"]]:
                left[i] -= 1
                if left[i] == 0:
                    _write_setting(store, rows_path, plan[i], out, ranks, args.device)
    log(f"all done in {time.perf_counter() - t_start:.0f} s")


def _write_setting(store, rows_path: Path, item, out: dict, ranks: dict, device: str) -> None:
    from ufm.measure.bank import reference_test

    setting, bank, todo = item
    bank_seconds = sum(out[c.key()]["seconds"] for c in bank)
    top, bottom, rank_seconds = ranks[json.dumps(setting.__dict__)]
    lines = []
    for (placement, feature, count), seed, cfg in todo:
        r = out[cfg.key()]
        ref = reference_test(store, cfg, r["M"], REFERENCES, device="cuda" if device == "cuda" else "cpu")
        lines.append(json.dumps({
            **setting.__dict__, "placement": placement, "feature": feature, "count": count, "seed": seed,
            "config_key": cfg.key(), "run_id": r["run_id"], "canary_indices": r["canary_indices"],
            "M": r["M"], "p_value": ref.p_value, "rank": ref.rank, "memorised": bool(ref.memorised) and r["learned"],
            "learned": r["learned"], "max_reference_M": max(ref.reference_M), "test_accuracy": r["test_accuracy"],
            "epochs_trained": r["epochs_trained"], "seconds": r["seconds"], "bank_seconds": bank_seconds,
            "ranking_seconds": rank_seconds, "references": REFERENCES, "alpha": cfg.alpha, "load": r["load"],
            "host_cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    with rows_path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    det = sum(json.loads(x)["memorised"] for x in lines)
    log(f"wrote {len(lines)} rows for {setting.label}: {det} detected; bank {bank_seconds:.0f} s")


# ----------------------------------------------------------------------------------------- table

def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        if p.exists():
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def summarise(rows: list[dict]) -> list[MapCell]:
    from ufm.measure.stats import wilson_interval

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["arch"], r["dataset"], r["train_size"], r["budget"], r["device"], r["placement"], r["feature"], r["count"])
        groups.setdefault(key, []).append(r)
    out = []
    for key, g in sorted(groups.items()):
        k, n = sum(bool(r["memorised"]) for r in g), len(g)
        low, high = wilson_interval(k, n)
        idx = g[0]["canary_indices"][0] if key[5] in ("top", "bottom") else None
        out.append(MapCell(*key, models=n, detected=k, low=low, high=high,
                           # the median: a run paused mid-training (SIGSTOP, a busy machine) inflates a mean
                           seconds_per_model=sorted(r["seconds"] for r in g)[n // 2], bank_seconds=g[0]["bank_seconds"],
                           references=g[0]["references"], alpha=g[0]["alpha"], canary_index=idx,
                           mean_M=sum(r["M"] for r in g) / n, load=sum(r["load"] for r in g) / n))
    return out


def markdown(cells_: list[MapCell]) -> str:
    lines = ["| device | arch | dataset | train images | budget | feature | count | top | random | bottom | one class "
             "| s / model | bank s |",
             "|---|---|---|---:|---|---|---:|---|---|---|---|---:|---:|"]
    by = {}
    for c in cells_:
        by.setdefault((c.device, c.arch, c.dataset, c.train_size, c.budget, c.feature, c.count), {})[c.placement] = c
    for key, cs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3], kv[0][4], kv[0][5], kv[0][6])):
        any_c = next(iter(cs.values()))

        def fmt(p: str) -> str:
            c = cs.get(p)
            return "" if c is None else f"{c.detected}/{c.models} ({c.low:.0%}-{c.high:.0%})"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:,} | {key[4]} | {key[5]} | {key[6]} | "
                     f"{fmt('top')} | {fmt('random')} | {fmt('bottom')} | {fmt('class')} | {any_c.seconds_per_model:.1f} | "
                     f"{any_c.bank_seconds:.0f} |")
    return "\n".join(lines) + "\n"


def not_measured(cells_: list[MapCell]) -> list[Setting]:
    """The settings of the CPU and GPU grids with no row yet (on CPU, the GPU rows wait for a lent device)."""
    measured = {c.setting for c in cells_}
    planned = dict.fromkeys(GRIDS["cpu"] + GRIDS["gpu"])
    return [s for s in planned if s not in measured]


def not_measured_markdown(settings: list[Setting]) -> str:
    if not settings:
        return ""
    return ("\nNot measured (settings of the grids with no rows yet; GPU settings need "
            "`run --grid gpu --device cuda`, see DEVELOPERS.md):\n\n" + "".join(f"* {s.label}\n" for s in settings))


def table(args: argparse.Namespace) -> None:
    from ufm.reports.plots import memorisation_map_figure

    paths = [Path(p) for p in args.rows] if args.rows else sorted(RESULTS.glob("memorisation-map-*.jsonl"))
    rows = load_rows(paths)
    cs = summarise(rows)
    MAP_FILE.write_text(json.dumps({"source": [p.name for p in paths], "rows": len(rows),
                                    "cells": [c.to_dict() for c in cs]}, indent=1) + "\n")
    md = markdown(cs) + not_measured_markdown(not_measured(cs))
    (RESULTS / "memorisation-map.md").write_text(
        "# Memorisation map: one canary, calibrated verdict (R = 39, p < 0.05)\n\n"
        "Each entry: canary models called memorised / models (95% Wilson interval). "
        "s / model: median training + scoring seconds of one canary model; bank s: the 39 reference models' "
        "sum (inflated where the grid was paused while a model trained).\n\n" + md)
    print(md)
    if args.png:
        import tempfile

        fig = memorisation_map_figure(cs, not_measured(cs))
        with tempfile.TemporaryDirectory() as tmp:  # plotly.js inline: 4 MB that need not be kept
            html = Path(tmp) / "map.html"
            html.write_text(fig.to_html(include_plotlyjs=True, full_html=True))
            _screenshot(html, ROOT / "assets" / "memorisation-map.png", fig.layout.height or 600)
    log(f"wrote {MAP_FILE}, {RESULTS / 'memorisation-map.md'}")


def _screenshot(html: Path, png: Path, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = b.new_page(viewport={"width": 1100, "height": int(height) + 20})
        page.goto(html.as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=str(png), full_page=True)
        b.close()
    log(f"wrote {png}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and append raw rows")
    r.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--seeds", type=int, default=3, help="canary models per cell outside the demos' cells")
    r.add_argument("--home", default=os.environ.get("UFM_MAP_HOME", "/tmp/ufm-map-home"))
    r.add_argument("--rows", default=None, help="JSON-lines file (default benchmarks/results/memorisation-map-DEVICE.jsonl)")
    r.add_argument("--only", default=None, help="only settings whose label contains this text")
    t = sub.add_parser("table", help="summarise rows into ufm/memorisation_map.json, Markdown and the heat-map")
    t.add_argument("--rows", nargs="*", default=None)
    t.add_argument("--png", action="store_true", help="also render assets/memorisation-map.png with chromium")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    main()
