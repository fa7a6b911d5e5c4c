"""Reproduce the paper's tables (Hartley & Tsaftaris 2022) and put its numbers beside ufm's.

A *target* is one of the paper's results:

* ``table1`` — MLP on MNIST and Fashion-MNIST, one canary per model;
* ``table2`` — CNN-1 on MNIST / Fashion-MNIST, CNN-2 and DenseNet-100 on CIFAR-10;
* ``table3`` — regularisers (dropout, augmentation, both, batch norm): MLP on MNIST /
  Fashion-MNIST, CNN-2 on CIFAR-10;
* ``figure4`` — TracIn self-influence vs M, MLP on MNIST, Pearson r.

Each *setting* (dataset, architecture, regularisers) is set up as in the paper (section 3.4):
a ranking model without canaries ranks the training images by TracIn self-influence
(:func:`ufm.attribution.sweep.cached_influence`), the letter A (5x5, one pixel from the top-left corner) goes
on the top-k and bottom-k images, one new model per canary. All settings of a target form one
study in the run store (:func:`create_reproduction_study`); :func:`run` trains it on any
:class:`ufm.runs.engine.Executor` and :func:`side_by_side` sets the paper's published numbers
(``paper_results.json``, cited) beside ufm's. A *scale* fixes the budget: ``smoke`` (tiny, a few
minutes on a 2-core CPU), ``quick`` (CPU-sized) and ``paper`` (full datasets, 500 epochs,
patience 10, 30 canaries: a GPU or a cluster).

A study killed half-way resumes: finished runs are reused from the store's cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd

from ufm.measure.stats import pearson, pearson_ci

from ufm.fileio import atomic_write
from ufm.reports.paper_setup import (ALPHA, SCALES, TARGETS, Scale, Setting, check_scale,  # noqa: F401 - re-exported
                                     paper_results, paper_source, settings)
from ufm.reports import html_page
from ufm.reports.run_report import EXPORT_NAMES, to_csv
from ufm.runs.store import Store

if TYPE_CHECKING:  # torch-importing modules load lazily: every ufm verb builds this module's parser
    from ufm.runs.engine import Executor
    from ufm.core.experiment import ExperimentConfig


def base_config(setting: Setting, scale: Scale, *, data_dir: str | None = None, device: str = "auto",
                seed: int = 0) -> ExperimentConfig:
    """The canary model of ``setting`` at ``scale`` (canary still to be chosen): the paper's
    feature (the letter A, 5x5, one pixel from the top-left corner), Adam with the architecture's
    default learning rate and batch size, early stopping on the validation loss."""
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import glyph

    return ExperimentConfig(feature=glyph("A"), dataset=setting.dataset, data_dir=data_dir, arch=setting.arch,
                            regularisers=setting.regularisers, canary=CanaryChoice("none", ()),
                            epochs=scale.epochs, patience=scale.patience, train_size=scale.train_size,
                            ood_size=scale.ood_size, candidates=scale.candidates, seed=seed, device=device)


def _ends(setting: Setting, scale: Scale) -> tuple[int, int]:
    if setting.target == "figure4":
        return scale.figure_top, scale.figure_bottom
    if setting.arch == "densenet100":
        return scale.densenet_top, scale.densenet_bottom
    return scale.top, scale.bottom


def study_name(target: str, scale: str, seed: int = 0) -> str:
    return f"reproduce {target} {scale} seed {seed}"


def create_reproduction_study(executor: "Executor", target: str, scale: str, *, data_dir: str | None = None,
                              device: str = "auto", seed: int = 0, say: Callable[[str], None] | None = None) -> str:
    """Rank each setting's training images by self-influence (the ranking model a run on
    ``executor``; the table cached under the store's home) and store the study of ``target`` at
    ``scale``: one member per canary, in group ``"<dataset> <arch> <regularisers> top|bottom"``.
    An existing study with the same members is kept (its finished runs count); one with other
    members is replaced (:func:`ufm.runs.studies.ensure_study`). Returns its name."""
    from ufm.attribution.sweep import cached_influence, sweep_members
    from ufm.runs.studies import ensure_study

    sc = check_scale(scale)
    members = []
    for s in settings(target):
        cfg = base_config(s, sc, data_dir=data_dir, device=device, seed=seed)
        if say is not None:
            say(f"ranking the training images of {s.label} by self-influence (ranking model, cached)")
        table = cached_influence(executor.store.home, cfg, n_checkpoints=sc.n_checkpoints, executor=executor)
        top, bottom = _ends(s, sc)
        for m in sweep_members(cfg, table, top, bottom):
            members.append(type(m)(f"{s.label} {m.group}", m.config))
    return ensure_study(executor.store, study_name(target, scale, seed), "custom", members[0].config, members,
                        description=f"paper {target} at scale {scale}: {sc.about}")


def run(executor: "Executor", name: str, *, say: Callable[[str], None] | None = None, poll: float = 0.5,
        timeout: float | None = None) -> list[str]:
    """Submit the members of study ``name`` that have no finished run to ``executor`` and wait
    for all (:func:`ufm.runs.engine.wait_for`); ``say`` gets a line whenever the count of
    finished runs changes."""
    from ufm.runs.engine import wait_for
    from ufm.runs.studies import submit_study

    ids = submit_study(executor, name)
    store = executor.store
    t0 = time.monotonic()

    def tell(*_: Any) -> None:
        if say is not None:
            statuses = [store.get(r).status for r in ids]
            n = sum(s in ("done", "failed", "cancelled") for s in statuses)
            say(f"{n}/{len(ids)} runs finished ({statuses.count('done')} done, {statuses.count('failed')} failed, "
                f"{statuses.count('running')} running) after {time.monotonic() - t0:.0f} s")

    tell()
    try:
        wait_for(executor, ids, progress=tell, poll=poll, timeout=timeout)
    except TimeoutError as e:
        raise TimeoutError(f"study {name!r}: {e}") from None
    return ids


# ---------------------------------------------------------------------------------- the tables

def canary_frame(store: Store, name: str, scale: str) -> pd.DataFrame:
    """One row per canary of study ``name``: setting, end (top/bottom), image index,
    self-influence and rank, and the run's numbers (:func:`ufm.runs.studies.runs_frame`; ``significant``
    is the verdict record, ``paper_ttest_p_below_alpha`` whether the paper's one-tailed Welch t-test
    p is below 0.05: the paper's statistic, shown to compare with the paper; it never decides)."""
    from ufm.runs.studies import get_study, runs_frame
    from ufm.attribution.sweep import cached_influence, ranking_config

    runs = runs_frame(store, name)
    entries = get_study(store, name).entries
    tables: dict[str, pd.DataFrame] = {}
    infl, rank = [], []
    for e in entries:
        key = ranking_config(e.config).key()
        if key not in tables:
            tables[key] = cached_influence(store.home, e.config,
                                           n_checkpoints=check_scale(scale).n_checkpoints).set_index("index")
        row = tables[key].loc[int(e.config.canary.indices[0])]
        infl.append(float(row["self_influence"]))
        rank.append(int(row["rank"]))
    df = runs.assign(setting=[" ".join(g.split()[:-1]) for g in runs["group"]],
                     end=[g.split()[-1] for g in runs["group"]],
                     dataset=[e.config.dataset for e in entries], arch=[e.config.arch for e in entries],
                     regularisers=["+".join(e.config.regularisers) or "none" for e in entries],
                     image=[int(e.config.canary.indices[0]) for e in entries], self_influence=infl,
                     influence_rank=rank)
    df["paper_ttest_p_below_alpha"] = df["p_value"] < ALPHA
    return df


def _paper(rows: list[dict], s: Setting, metric: str) -> list[dict]:
    return [r for r in rows if r["table"] == s.target and r["dataset"] == s.dataset and r["arch"] == s.arch
            and r["regularisers"] == s.regulariser_label and r["metric"] == metric]


def _fmt_list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2g}" for v in values)


TABLE_COLUMNS = ["target", "dataset", "arch", "regularisers", "canaries", "done", "paper_top5_M", "ufm_top5_M",
                 "paper_mean_M_positive", "ufm_mean_M_positive", "ufm_n_M_positive", "paper_mean_X_u_positive",
                 "ufm_mean_X_u_positive", "paper_mean_X_r_positive", "ufm_mean_X_r_positive",
                 "paper_top5_ttest_p_below_alpha", "ufm_share_memorised_verdict", "ufm_share_paper_ttest_p_below_alpha",
                 "paper_accuracy", "ufm_test_accuracy", "paper_ref"]
FIGURE_COLUMNS = ["target", "dataset", "arch", "regularisers", "canaries", "done", "paper_pearson_r", "ufm_pearson_r",
                  "ufm_pearson_p", "ufm_r_ci_low", "ufm_r_ci_high", "ufm_share_memorised_verdict",
                  "ufm_share_paper_ttest_p_below_alpha", "ufm_test_accuracy", "paper_ref"]


def side_by_side(canaries: pd.DataFrame, target: str) -> pd.DataFrame:
    """The paper's numbers beside ufm's, one row per setting of ``target``.

    Tables: top-5 M (largest first), M averaged over canaries with M > 0 (the paper's AVERAGE
    rows) with X_u/X_r over the same canaries, the share of canaries memorised by the verdict
    record and the share with the paper's t-test p below 0.05 (its statistic), test accuracy (the paper gives validation
    accuracy for CIFAR-10 only). Figure 4: Pearson r of self-influence and M, its p-value and
    95% Fisher-z interval. Paper cells with no published value are NaN/empty."""
    paper = paper_results()
    out = []
    for s in settings(target):
        g = canaries[canaries["setting"] == s.label]
        done = g[g["status"] == "done"]
        pos = done[done["M"] > 0]
        acc = float(done["test_accuracy"].mean()) if len(done) else math.nan
        share_v = float(done["significant"].astype(bool).mean()) if len(done) else math.nan
        share_t = float(done["paper_ttest_p_below_alpha"].astype(bool).mean()) if len(done) else math.nan
        refs = sorted({r["ref"] for r in paper if r["table"] == s.target and r["dataset"] == s.dataset
                       and r["arch"] == s.arch and r["regularisers"] == s.regulariser_label})
        row: dict[str, Any] = {"target": target, "dataset": s.dataset, "arch": s.arch,
                               "regularisers": s.regulariser_label, "canaries": len(g), "done": len(done),
                               "ufm_share_memorised_verdict": share_v, "ufm_share_paper_ttest_p_below_alpha": share_t,
                               "ufm_test_accuracy": acc, "paper_ref": "; ".join(refs)}
        if target == "figure4":
            r, p = pearson(done["self_influence"], done["M"])
            lo, hi = pearson_ci(r, len(done))
            pr = _paper(paper, s, "pearson_r")
            row.update(paper_pearson_r=pr[0]["value"] if pr else math.nan, ufm_pearson_r=r, ufm_pearson_p=p,
                       ufm_r_ci_low=lo, ufm_r_ci_high=hi)
        else:
            top5 = _paper(paper, s, "M")
            one = lambda m: (_paper(paper, s, m) or [{"value": math.nan}])[0]["value"]  # noqa: E731
            row.update(paper_top5_M=_fmt_list([r["value"] for r in top5]),
                       ufm_top5_M=_fmt_list(sorted(done["M"], reverse=True)[:5]),
                       paper_mean_M_positive=one("mean_M_positive"),
                       ufm_mean_M_positive=float(pos["M"].mean()) if len(pos) else math.nan,
                       ufm_n_M_positive=len(pos),
                       paper_mean_X_u_positive=one("mean_X_u_positive"),
                       ufm_mean_X_u_positive=float(pos["X_u"].mean()) if len(pos) else math.nan,
                       paper_mean_X_r_positive=one("mean_X_r_positive"),
                       ufm_mean_X_r_positive=float(pos["X_r"].mean()) if len(pos) else math.nan,
                       paper_top5_ttest_p_below_alpha=(f"{sum(bool(r.get('significant')) for r in top5)}/{len(top5)}"
                                               if top5 else ""),
                       paper_accuracy=one("val_accuracy"))
        out.append(row)
    return pd.DataFrame(out, columns=FIGURE_COLUMNS if target == "figure4" else TABLE_COLUMNS)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    """``df`` as a GitHub Markdown table (NaN as '–', floats to 4 significant digits)."""
    cols = [c for c in df.columns if c != "paper_ref"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in cols) + " |" for _, row in df.iterrows()]
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame, canaries: pd.DataFrame, target: str, scale: str, seconds: float | None) -> str:
    """A self-contained report: the side-by-side table, the runs, and for figure 4 the scatter."""
    from ufm.reports.plots import influence_scatter_figure

    src = paper_source()
    sc = SCALES[scale]
    body = [f"<h1>ufm vs the paper: {html_page.esc(target)} at scale {html_page.esc(scale)}</h1>",
            f'<p class="note">Paper: {html_page.esc(src["paper"])}. {html_page.esc(src["note"])}</p>',
            f"<p>Scale <b>{html_page.esc(scale)}</b>: {html_page.esc(sc.about)}."
            + (f" Wall time of this reproduction: {seconds:.0f} s." if seconds is not None else "") + "</p>",
            "<h2>Side by side</h2>", html_page.table(list(table.columns), table.itertuples(index=False))]
    if target == "figure4":
        done = canaries[canaries["status"] == "done"]
        if len(done):
            fig = influence_scatter_figure(done["self_influence"], done["M"], groups=done["end"],
                                           labels=[f"image {i}" for i in done["image"]])
            body += ["<h2>Self-influence vs M</h2>", html_page.figure_html(fig, "scatter", 450)]
    cols = ["setting", "end", "image", "self_influence", "influence_rank", "status", "M", "X_u", "X_r", "p_value",
            "paper_ttest_p_below_alpha", "exposure_p_value", "verdict", "verdict_test", "test_accuracy", "run_id"]
    headers = [EXPORT_NAMES.get(c, c) for c in cols]  # p_value: the paper's t-test, named so
    body += ["<h2>Canaries</h2>", html_page.table(headers, canaries[cols].itertuples(index=False))]
    return html_page.page(f"ufm reproduce {target} {scale}", body)


@dataclass
class Reproduction:
    """What :func:`reproduce` wrote: the table, the per-canary rows, and the files."""

    target: str
    scale: str
    table: pd.DataFrame
    canaries: pd.DataFrame
    files: list[Path]
    seconds: float
    study: str


def write_outputs(store: Store, name: str, target: str, scale: str, out_dir: str | Path,
                  seconds: float | None = None) -> Reproduction:
    """Write ``<target>.csv``/``.md``/``.html`` (side by side) and ``<target>-canaries.csv``
    (one row per canary) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    canaries = canary_frame(store, name, scale)
    table = side_by_side(canaries, target)
    files = [out / f"{target}.csv", out / f"{target}.md", out / f"{target}.html", out / f"{target}-canaries.csv"]
    src = paper_source()
    md = (f"# {target} at scale {scale}: the paper vs ufm\n\nPaper: {src['paper']}; references: "
          + "; ".join(sorted({r for r in table['paper_ref'] if r})) + f".\n\nScale {scale}: {SCALES[scale].about}."
          + (f" Wall time {seconds:.0f} s." if seconds is not None else "") + "\n\n" + to_markdown(table))
    atomic_write(files[0], to_csv(table))
    atomic_write(files[1], md)
    atomic_write(files[2], to_html(table, canaries, target, scale, seconds))
    atomic_write(files[3], to_csv(canaries))
    return Reproduction(target, scale, table, canaries, files, seconds or math.nan, name)


def reproduce(executor: "Executor", target: str, scale: str, out_dir: str | Path, *, data_dir: str | None = None,
              device: str = "auto", seed: int = 0, say: Callable[[str], None] | None = None) -> list[Reproduction]:
    """Build, run and tabulate ``target`` (one of :data:`TARGETS`, or ``"all"``) at ``scale`` on
    ``executor``; writes the files of :func:`write_outputs` per target. Finished runs are
    reused, so running it again after an interruption trains only what is missing."""
    targets = list(TARGETS) if target == "all" else [target]
    for t in targets:
        settings(t)  # validates the target before anything trains
    check_scale(scale)
    out = []
    for t in targets:
        t0 = time.monotonic()
        name = create_reproduction_study(executor, t, scale, data_dir=data_dir, device=device, seed=seed, say=say)
        if say is not None:
            say(f"study {name!r}: {len(_entries(executor.store, name))} canary models")
        run(executor, name, say=say)
        out.append(write_outputs(executor.store, name, t, scale, out_dir, time.monotonic() - t0))
    return out


def _entries(store: Store, name: str) -> list[Any]:
    from ufm.runs.studies import get_study

    return list(get_study(store, name).entries)
