"""Exports: a run as JSON, all runs as a table (CSV), a run or a study as a self-contained HTML report.

The HTML embeds plotly.js once, inline (no CDN, no network: the file opens on a machine with no
internet, and in ten years), followed by the figures of :mod:`ufm.reports.plots`, the config tables and
the versions of ufm and torch that made each number. The HTML pieces are in :mod:`ufm.reports.html_page`.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from ufm.reports.html_page import esc, figure_html, fmt, kv_table, page, pct, table
from ufm.runs.store import RunRecord, Store
from ufm.runs.store.records import export_keys


if TYPE_CHECKING:
    from ufm.runs.studies import Study
    from ufm.measure.verdict import Verdict


# ---------------------------------------------------------------------------------- JSON and CSV

def run_json(store: Store, run_id: str, *, indent: int | None = 1) -> str:
    """A run as JSON: ``{"run": the database record, "result": the full Result dict or null}``.

    ``result`` (with ``d_u``, ``d_r``, the history, access scores, versions) is there for ``done``
    runs (the fast test's ``verdict`` and ``significant`` named ``fast_test_verdict`` and
    ``fast_test_memorised``: :func:`ufm.runs.store.records.export_keys`); a failed or cancelled run
    carries its ``error`` in ``run``. ``run.verdict`` is the verdict record
    (:func:`ufm.measure.verdict.stored_verdict`, brought up to date first): the verdict every surface shows.
    """
    from ufm.measure.verdict import stored_verdict

    stored_verdict(store, store.get(run_id))
    rec = store.get(run_id)
    result = json.loads(store.artifact(run_id, "result.json").read_text()) if rec.status == "done" else None
    if result is not None:  # its verdict/significant are the fast test's: named so beside the verdict record
        result = export_keys(result)
    return json.dumps({"run": rec.to_dict(), "result": result}, indent=indent, allow_nan=False)


# The numbers people look for first (M, the verdict, accuracy) come right after the id and status,
# so they are on screen in the dashboard's table without scrolling. The verdict columns are the run's
# verdict record (ufm.measure.verdict): verdict = its headline, verdict_p = the deciding p-value, verdict_test
# = which test decided (reference: calibrated; fast: provisional), verdict_text = the full sentence.
# The t-tests are the paper's statistics and say so in their names; they never decide.
RUN_TABLE_COLUMNS = ["id", "status", "M", "verdict", "verdict_p", "test_accuracy", "learned", "dataset", "arch", "regularisers",
                     "feature", "canary", "seed", "created", "finished", "seconds", "max_epochs", "train_size", "X_u",
                     "X_r", "verdict_test", "verdict_text", "ttest_p_paper", "paired_ttest_p_paper", "exposure",
                     "exposure_p_value", "epochs_trained", "epsilon", "bank", "progress", "config_key", "code_version",
                     "error"]


def iso_time(t: float | None) -> str | None:
    """Unix seconds as local ``YYYY-MM-DD HH:MM:SS`` (None stays None)."""
    return None if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe_canary(d: dict[str, Any]) -> str:
    from ufm.core.canary_words import describe_canaries  # not ufm.core.canary: `ufm runs list` loads no torch
    return describe_canaries(d["mode"], d.get("indices", ()), d.get("count", 1), d.get("label"))


def describe_progress(rec: RunRecord) -> str:
    """``"train epoch 3/500, val loss 0.41"`` for a running run, ``""`` otherwise."""
    p = rec.progress
    if rec.status != "running" or not p:
        return ""
    if p.get("phase") == "train":
        vl = p.get("val_loss")
        return f"train epoch {p.get('epoch')}/{p.get('max_epochs')}" + ("" if vl is None else f", val loss {vl:.4g}")
    return f"{p.get('phase')}: {p.get('message', '')}".strip(": ")


def run_row(rec: RunRecord, verdict: "Verdict | None" = None) -> dict[str, Any]:
    """One run as a flat dict with the columns of :data:`RUN_TABLE_COLUMNS` (M etc. in nats,
    exposure in bits, accuracy 0-1, times as local ISO strings, seconds = finished - started).

    ``verdict``: the run's verdict record (:func:`ufm.measure.verdict.stored_verdict`); None = as stored
    in ``rec`` (nothing for a run that is not done)."""
    from ufm.measure.verdict import Verdict

    c, s = rec.config_data, rec.summary or {}
    feat = c.get("feature", {})
    v = verdict if verdict is not None else (Verdict.from_dict(rec.verdict) if rec.verdict else None)
    audit = c.get("audit")
    canary = describe_canary(c["canary"]) if "canary" in c else None
    if audit is not None:  # a privacy audit: its canaries, and its bound where the verdict goes
        canary = f"privacy audit: {audit['canaries']} canaries"
    return {
        "id": rec.id, "status": rec.status, "created": iso_time(rec.created), "finished": iso_time(rec.finished),
        "seconds": None if rec.finished is None or rec.started is None else round(rec.finished - rec.started, 3),
        "dataset": c.get("dataset"), "arch": c.get("arch"), "regularisers": "+".join(c.get("regularisers", [])) or "none",
        "feature": "audit canaries" if audit is not None else feat.get("name"), "canary": canary,
        "seed": c.get("seed"), "max_epochs": c.get("epochs"), "train_size": c.get("train_size"),
        **{k: s.get(k) for k in ("M", "X_u", "X_r", "exposure", "exposure_p_value", "test_accuracy", "epochs_trained",
                                 "epsilon")},
        "ttest_p_paper": s.get("p_value"), "paired_ttest_p_paper": s.get("p_value_paired"),
        "verdict": v.headline if v else audit_bound_text(s), "verdict_p": v.p_value if v else None,
        "verdict_test": v.test if v else None, "verdict_text": v.sentence if v else None, "bank": rec.bank,
        # False marks a model at chance accuracy: its run says nothing about memorisation either way
        "learned": s.get("learned") if s else None,
        "progress": describe_progress(rec), "config_key": rec.config_key, "code_version": rec.code_version,
        "error": rec.error,
    }


def audit_bound_text(summary: dict[str, Any]) -> str | None:
    """``"epsilon >= 0.52 (95%, delta 1e-05)"`` for a finished privacy-audit run's summary, else None."""
    if summary.get("kind") != "privacy audit" or summary.get("audit_epsilon_lb") is None:
        return None
    return (f"epsilon >= {summary['audit_epsilon_lb']:.3g} ({summary['audit_confidence']:.0%}, "
            f"delta {summary['audit_delta']:g})")


def runs_table(store: Store, status: str | Sequence[str] | None = None) -> pd.DataFrame:
    """All runs (newest first), one row each, columns :data:`RUN_TABLE_COLUMNS`; the verdicts are
    the records, brought up to date (:func:`ufm.measure.verdict.stored_verdict`)."""
    from ufm.measure.verdict import stored_verdict

    return pd.DataFrame([run_row(r, stored_verdict(store, r)) for r in store.list_runs(status)],
                        columns=RUN_TABLE_COLUMNS)


BANK_COLUMNS = ["bank", "setting", "models", "done", "active", "failed", "created"]


def bank_summary(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """The reference models among ``records`` grouped by bank (newest bank first): per bank its key,
    the training setting in words, and how many models are done, queued or running (``active``),
    failed or cancelled; ``created``: when its newest model was queued (local ISO)."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        if r.bank is not None:
            groups.setdefault(r.bank, []).append(r)
    out = []
    for bank, rs in groups.items():
        c = rs[0].config_data
        regs = "+".join(c.get("regularisers", [])) or "no regularisers"
        setting = (f"{c.get('dataset')} · {c.get('arch')} · {regs} · {c.get('train_size') or 'all'} images · "
                   f"{c.get('epochs')} epochs max")
        out.append({"bank": bank, "setting": setting, "models": len(rs),
                    "done": sum(r.status == "done" for r in rs),
                    "active": sum(r.status in ("queued", "running") for r in rs),
                    "failed": sum(r.status in ("failed", "cancelled") for r in rs),
                    "created": iso_time(max(r.created for r in rs))})
    return sorted(out, key=lambda b: b["created"] or "", reverse=True)


def runs_csv(store: Store, status: str | Sequence[str] | None = None) -> str:
    """:func:`runs_table` as CSV text (formula-safe, see :func:`to_csv`)."""
    return to_csv(runs_table(store, status))


# A spreadsheet runs a cell starting with one of these as a formula ("=HYPERLINK(...)" in a
# feature name or an error message); tab and CR are OWASP's additions for Excel's parser.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """One CSV cell: a string that starts like a formula gets a leading ``'``; numbers (negative
    ones included), None and booleans pass unchanged, so numeric columns stay numeric."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# Column names as exported: the study and sweep frames call the paper's t-tests p_value /
# p_value_paired and the verdict's "memorised" significant (internal names); a file that people read
# names the t-tests as the paper's statistics and never calls anything "significant".
EXPORT_NAMES = {"p_value": "ttest_p_paper", "p_value_paired": "paired_ttest_p_paper", "significant": "memorised",
                "share_significant": "share_memorised", "n_significant": "n_memorised"}


def export_names(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the columns of :data:`EXPORT_NAMES` renamed for people (CSV, JSON, printed tables)."""
    return df.rename(columns=EXPORT_NAMES)


def to_csv(df: pd.DataFrame) -> str:
    """``df`` as CSV text (no index) with every string cell and header passed through :func:`csv_safe`,
    columns named as exported (:func:`export_names`).

    Every CSV that ufm writes goes through here (runs, studies, sweeps)."""
    safe = export_names(df).rename(columns=lambda c: csv_safe(c) if isinstance(c, str) else c)
    obj = [c for c in safe.columns if safe[c].dtype == object or pd.api.types.is_string_dtype(safe[c])]
    if obj:
        safe = safe.copy()
        for c in obj:
            safe[c] = safe[c].map(csv_safe)
    return safe.to_csv(index=False)


# ---------------------------------------------------------------------------------- HTML pieces

def config_rows(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """An ExperimentConfig dict as (setting, value) rows for people (the feature's pixels are
    summarised by name, size and offset; DP settings only when DP-SGD is on)."""
    rows: list[tuple[str, Any]] = []
    if d.get("audit") is not None:  # a privacy audit draws its own features; the config's glyph is unused
        a = d["audit"]
        rows.append(("privacy audit", f"{a['canaries']} {a['features']} canaries, {a['feature_size']} px, "
                                      f"placement {a['placement']}, OUT {a['out_mode']}, score {a['score']}"))
        d = {k: v for k, v in d.items() if k not in ("audit", "feature", "canary")}
    feat = d.get("feature", {})
    grid = feat.get("pattern") or [[]]
    if grid[0] and isinstance(grid[0][0], list):  # a colour feature, (3, h, w)
        grid = grid[0]
    row, col = feat.get("offset", ("?", "?"))
    if feat:
        rows.append(("feature", f"{feat.get('name')} ({len(grid)}x{len(grid[0])} px at row {row}, col {col}, "
                                f"intensity {feat.get('intensity')})"))
        rows.append(("canary", describe_canary(d["canary"]) if "canary" in d else "–"))
    regs = d.get("regularisers", [])
    rows.append(("regularisers", "+".join(regs) or "none"))
    skip = {"feature", "canary", "regularisers", "dp"}
    for k, v in d.items():
        if k in skip or (k == "dropout" and "dropout" not in regs) or (k == "weight_decay" and "weight-decay" not in regs):
            continue
        rows.append((k, "default" if v is None else v))
    if "dp-sgd" in regs:
        rows += [(f"dp.{k}", v) for k, v in d.get("dp", {}).items()]
    return rows


def _versions_table(versions: dict[str, dict[str, str]]) -> str:
    """Rows: run id; columns: the packages (ufm, torch, numpy, python)."""
    keys = ["ufm", "torch", "numpy", "python"]
    extra = sorted({k for v in versions.values() for k in v} - set(keys))
    cols = keys + extra
    return table(["run", *cols], ([rid, *(v.get(k) for k in cols)] for rid, v in versions.items()))


def _summary_pairs(s: dict[str, Any], v: "Verdict | None") -> list[tuple[str, Any]]:
    verdict = [] if v is None else [("verdict", v.headline), (v.p_label, v.p_text)]
    return [*verdict, ("M = X_u - X_r (nats)", s.get("M")), ("X_u (nats)", s.get("X_u")), ("X_r (nats)", s.get("X_r")),
            ("t-test p (Welch, one-tailed; the paper's statistic, never decides)", s.get("p_value")),
            ("paired t-test p (the paper's statistic, never decides)", s.get("p_value_paired")),
            ("exposure (bits)", s.get("exposure")),
            ("exposure p (the fast test)", s.get("exposure_p_value")),
            ("test accuracy", pct(s.get("test_accuracy"))),
            ("epochs trained", s.get("epochs_trained")), ("stopped by", s.get("stopped")),
            ("DP epsilon", s.get("epsilon")), ("canary indices", ", ".join(map(str, s.get("canary_indices", [])))
                                               or "none"), ("inference images", s.get("n_ood"))]


# ---------------------------------------------------------------------------------- HTML reports

def run_html(store: Store, run_id: str) -> str:
    """A one-run report: verdict, numbers, d_u vs d_r histogram, training curves, config, versions."""
    from ufm.reports.plots import histogram_figure, loss_curve_figure

    from ufm.measure.verdict import stored_verdict

    v = stored_verdict(store, store.get(run_id))
    rec = store.get(run_id)
    body = [f"<h1>ufm run {esc(rec.id)}</h1>",
            kv_table([("status", rec.status), ("created", iso_time(rec.created)), ("finished", iso_time(rec.finished)),
                      ("ufm version", rec.code_version), ("config key", rec.config_key)])]
    if rec.error:
        body.append(f'<p class="error">{esc(rec.error)}</p>')
    versions: dict[str, dict[str, str]] = {}
    if rec.status == "done" and rec.summary and rec.is_privacy_audit:
        from ufm.audits.privacy_audit_figure import audit_histogram
        from ufm.audits.privacy_audit_store import audit_of_run

        res = audit_of_run(store, rec)
        body += ["<h2>Privacy audit</h2>", "".join(f"<p>{esc(line)}</p>" for line in res.summary_lines()),
                 figure_html(audit_histogram(res), "fig-audit", 420),
                 "<h2>Training</h2>", figure_html(loss_curve_figure(store.load_history(run_id)), "fig-loss", 380)]
        versions[rec.id] = rec.summary.get("versions", {})
    elif rec.status == "done" and rec.summary:
        s = rec.summary
        d_u, d_r = store.load_scores(run_id)
        history = store.load_history(run_id)
        sentence = v.sentence if v is not None else s.get("verdict", "")
        body += [f'<p class="verdict">{esc(sentence)}</p>', "<h2>Memorisation</h2>",
                 kv_table(_summary_pairs(s, v)),
                 figure_html(histogram_figure(d_u, d_r), "fig-hist", 420),
                 "<h2>Training</h2>", figure_html(loss_curve_figure(history), "fig-loss", 380)]
        versions[rec.id] = s.get("versions", {})
    else:
        body.append(f'<p class="note">No results: the run is {esc(rec.status)}.</p>')
    body += ["<h2>Configuration</h2>", kv_table(config_rows(rec.config_data))]
    if versions:
        body += ["<h2>Versions</h2>", _versions_table(versions)]
    return page(f"ufm run {rec.id}", body)


def _differences(base: dict[str, Any], d: dict[str, Any]) -> str:
    base_rows, rows = dict(config_rows(base)), dict(config_rows(d))
    diff = [f"{k} = {fmt(v)}" for k, v in rows.items() if k != "seed" and base_rows.get(k) != v]
    return "; ".join(diff) or "as the base config"


def _share_cell(r) -> str:
    """"k of n" memorised over the runs with an answer; runs whose model did not learn (accuracy at
    chance) or are otherwise inconclusive are counted apart, never as "not memorised"."""
    if not r.done:
        return "–"
    answered = r.done - r.n_inconclusive
    cell = f"{r.n_significant} of {answered}"
    if r.n_not_learned:
        cell += f"; {r.n_not_learned} did not learn (inconclusive)"
    elif r.n_inconclusive:
        cell += f"; {r.n_inconclusive} inconclusive"
    return cell


def study_html(store: Store, name: str) -> str:
    """A study report: per-group mean M with 95% intervals (table and bar chart), the d_u vs d_r
    histogram of every finished run (small multiples), the runs, the configs and versions."""
    from ufm.reports.plots import histogram_figure, m_bar_figure
    from ufm.runs.studies import aggregate, get_study, runs_frame

    study: Study = get_study(store, name)
    runs = runs_frame(store, name)
    agg = aggregate(runs)
    base = study.base_config.to_dict()
    body = [f"<h1>ufm study: {esc(study.name)}</h1>",
            kv_table([("kind", study.kind), ("created", iso_time(study.created)), ("members", len(study.entries)),
                      ("groups", len(study.groups)), ("description", study.description or "–")])]

    body += ["<h2>Memorisation by group</h2>",
             '<p class="note">Mean M over the finished runs of each group (seeds) with a 95% Student-t interval; '
             'a group with one finished run has no interval. "Memorised (verdict)" counts the runs whose verdict '
             "record says memorised (calibrated where the run's reference models exist, else the provisional "
             "fast test); the paper's t-test never decides.</p>",
             table(["group", "finished / members", "mean M (nats)", "95% interval", "memorised (verdict)",
                    "mean test accuracy", "epsilon spent (DP-SGD)"],
                    ([r.group, f"{r.done} / {r.members}", r.mean_M,
                      f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]" if not math.isnan(r.ci_low) else r.interval,
                      _share_cell(r), pct(r.mean_test_accuracy),
                      "–" if math.isnan(r.mean_epsilon) else f"{r.mean_epsilon:.3g}"]
                     for r in agg.itertuples()))]
    if (agg["done"] > 0).any():
        shown = agg[agg["done"] > 0]
        body.append(figure_html(m_bar_figure(list(shown["group"]), list(shown["mean_M"]),
                                             [None if math.isnan(v) else v for v in shown["ci_low"]],
                                             [None if math.isnan(v) else v for v in shown["ci_high"]]),
                                 "fig-m-bar", 420))

    done = runs[runs["status"] == "done"]
    versions: dict[str, dict[str, str]] = {}
    if len(done):
        body += ["<h2>Output changes per run: d_u vs d_r</h2>", '<div class="grid">']
        for r in done.itertuples():
            d_u, d_r = store.load_scores(r.run_id)
            fig = histogram_figure(d_u, d_r, title=f"{r.group}, seed {r.seed}: M = {r.M:.3g}")
            # small multiples: the legend below the plot, where a narrow figure has room for it
            fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=-0.3, yanchor="top"),
                              margin=dict(t=50, b=110))
            body.append(figure_html(fig, f"fig-hist-{r.position}", 400))
            versions[r.run_id] = (store.get(r.run_id).summary or {}).get("versions", {})
        body.append("</div>")

    body += ["<h2>Runs</h2>",
             table(["#", "group", "seed", "run", "status", "M (nats)", "verdict", "verdict p", "test accuracy",
                    "error"],
                    ([r.position, r.group, r.seed, r.run_id or "–", r.status, r.M, r.verdict_headline,
                      r.verdict_p_text, pct(r.test_accuracy), r.error]
                     for r in runs.itertuples()))]
    body += ["<h2>Configuration</h2>", "<p>Base configuration:</p>", kv_table(config_rows(base)),
             "<p>Groups (what differs from the base, besides the seed):</p>",
             table(["group", "differs by", "seeds"],
                   ([g, _differences(base, next(e.config.to_dict() for e in study.entries if e.group == g)),
                     ", ".join(str(e.config.seed) for e in study.entries if e.group == g)]
                    for g in study.groups))]
    if versions:
        body += ["<h2>Versions</h2>", _versions_table(versions)]
    return page(f"ufm study {study.name}", body)
