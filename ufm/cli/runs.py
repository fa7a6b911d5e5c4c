"""CLI verbs for the run store: ``ufm runs ...`` and ``ufm studies ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ufm.runs.store import STATUSES, RunRecord, Store, StoreError
from ufm.cli.common import UsageError, _pos_int, add_home, check_out, finite_float, open_store

LIST_COLUMNS = ["id", "status", "created", "dataset", "arch", "regularisers", "canary", "seed", "M",
                "verdict", "verdict_p", "test_accuracy", "epsilon", "note"]


def _check_out(a: argparse.Namespace) -> None:
    """Refuse an unwritable ``--out`` before the store is read (see :func:`~ufm.cli.common.check_out`)."""
    check_out(getattr(a, "out", None))


def _write_out(text: str, out: str | None) -> None:
    from ufm.fileio import atomic_write as write_atomic

    if out in (None, "-"):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        write_atomic(Path(out), text, private=True)  # run records name their feature: 0600
        print(f"wrote {out}", file=sys.stderr)


def _resolve(store: Store, run_id: str) -> str:
    try:
        return store.resolve(run_id)
    except StoreError as e:
        raise UsageError(str(e)) from e


# ---------------------------------------------------------------------------------- runs

def cmd_runs_list(a: argparse.Namespace) -> int:
    import pandas as pd

    from ufm.reports.run_report import RUN_TABLE_COLUMNS, fmt, run_row, to_csv
    from ufm.measure.verdict import stored_verdict

    _check_out(a)
    with open_store(a) as store:
        records = store.list_runs(a.status, limit=a.limit)
        if not a.all:  # reference models: one line per bank below, not 39 lines each
            banks = [r for r in records if r.is_reference]
            records = [r for r in records if not r.is_reference]
        verdicts = {r.id: stored_verdict(store, r) for r in records}  # the records, brought up to date
        records = [store.get(r.id) for r in records]
        if a.json:
            _write_out(json.dumps([r.to_dict() for r in records], indent=1), a.out)
            return 0
        if a.csv:
            table = pd.DataFrame([run_row(r, verdicts[r.id]) for r in records], columns=RUN_TABLE_COLUMNS)
            _write_out(to_csv(table), a.out)
            return 0
    if not records and (a.all or not banks):
        print(f"no runs in {store.db_path}" + (f" with status {a.status}" if a.status else ""), file=sys.stderr)
        return 0
    header = ["id", "status", "created", "dataset", "arch", "regularisers", "canary", "seed", "M (nats)",
              "verdict", "verdict p", "test acc", "eps spent", "note"]
    rows = [header]
    for rec in records:
        r = run_row(rec, verdicts[rec.id])
        r["note"] = r["progress"] or (r["error"] or "")[:60]
        acc = r["test_accuracy"]
        r["test_accuracy"] = "–" if acc is None else f"{100 * acc:.1f}%"
        r["epsilon"] = "–" if r["epsilon"] is None else f"{r['epsilon']:.3g}"  # DP-SGD's accountant
        r["verdict_p"] = verdicts[rec.id].p_text if verdicts[rec.id] is not None else None
        rows.append([fmt(r[c]) for c in LIST_COLUMNS])
    widths = [max(len(str(x)) for x in col) for col in zip(*rows)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    if not a.all and banks:
        lines.append("")
        lines += [f"reference models (--all lists them): {line}" for line in bank_lines(banks)]
    _write_out("\n".join(lines), a.out)
    return 0


def bank_lines(records: "list[RunRecord]") -> list[str]:
    """One line per bank of reference models: its key, setting and how many are done, queued, failed."""
    from ufm.reports.run_report import bank_summary

    return [f"bank {b['bank']} ({b['setting']}): {b['done']} done, {b['active']} queued or training, "
            f"{b['failed']} failed or cancelled" for b in bank_summary(records)]


def cmd_runs_show(a: argparse.Namespace) -> int:
    from ufm.reports.run_report import config_rows, describe_progress, fmt, iso_time
    from ufm.measure.verdict import stored_verdict

    with open_store(a) as store:
        rec = store.get(_resolve(store, a.id))
        verdict = stored_verdict(store, rec)  # the record, brought up to date (e.g. the bank completed)
        rec = store.get(rec.id)
        run_dir = store.run_dir(rec.id)
    if a.json:
        print(json.dumps(rec.to_dict(), indent=1))
        return 0
    lines = [f"run {rec.id}  {rec.status}", f"created {iso_time(rec.created)}  finished {iso_time(rec.finished) or '-'}  "
             f"ufm {rec.code_version}  config key {rec.config_key}"]
    if rec.status == "running":
        lines.append(f"progress: {describe_progress(rec)} (owner pid {rec.owner_pid} on {rec.owner_host})")
    if rec.error:
        lines.append(f"{'note' if rec.status == 'done' else 'error'}: {rec.error}")
    if rec.summary and rec.is_privacy_audit:
        from ufm.reports.run_report import audit_bound_text

        s = rec.summary
        lines += [f"privacy audit: {s['audit_canaries']} canaries ({s['audit_in']} IN); {audit_bound_text(s)}, "
                  f"{s['audit_correct']} of {s['audit_guesses']} guesses correct (other delta or confidence: "
                  "'ufm privacy-audit' with the same settings reuses this run)",
                  f"test accuracy {fmt(s['test_accuracy'])}  epochs {s['epochs_trained']}  "
                  f"DP epsilon {fmt(s.get('epsilon'))}",
                  f"images used: {fmt(s.get('n_train'))} training + {fmt(s.get('n_val'))} validation, "
                  f"{fmt(s.get('n_ood'))} inference"]
        lines += [f"note: {n}" for n in s.get("notes", [])]
    elif rec.summary:
        s = rec.summary
        if verdict is not None:
            lines += [f"verdict: {verdict.sentence}", f"{verdict.p_label} = {verdict.p_text}"]
            if verdict.calibration:
                lines.append(f"calibration: {verdict.calibration}")
        lines += [f"M = {fmt(s['M'])}  (X_u = {fmt(s['X_u'])}, X_r = {fmt(s['X_r'])}; nats)",
                  f"the paper's statistics (never decide): t-test p = {fmt(s['p_value'])}   "
                  f"paired t-test p = {fmt(s['p_value_paired'])}",
                  f"fast test: exposure = {fmt(s['exposure'])} bits, empirical p = {fmt(s['exposure_p_value'])}",
                  f"test accuracy {fmt(s['test_accuracy'])}  epochs {s['epochs_trained']}  "
                  f"DP epsilon {fmt(s.get('epsilon'))}",
                  f"images used: {fmt(s.get('n_train'))} training + {fmt(s.get('n_val'))} validation, "
                  f"{fmt(s.get('n_ood'))} inference"]
        lines += [f"note: {n}" for n in s.get("notes", [])]
    lines.append("config:")
    lines += [f"  {k}: {fmt(v)}" for k, v in config_rows(rec.config_data)]
    lines.append(f"artifacts: {run_dir}")
    print("\n".join(lines))
    return 0


def cmd_runs_export(a: argparse.Namespace) -> int:
    from ufm.reports.run_report import run_html, run_json

    _check_out(a)
    if (a.mean or a.std) and a.format != "onnx":
        raise UsageError("--mean/--std apply only to --format onnx")
    if a.format == "onnx":
        return _export_onnx(a)
    with open_store(a) as store:
        run_id = _resolve(store, a.id)
        try:
            if a.format == "json":
                text = run_json(store, run_id)
            else:
                if a.out in (None, "-") and sys.stdout.isatty():
                    raise UsageError("an HTML report is several MB: give --out FILE (e.g. --out run.html)")
                text = run_html(store, run_id)
        except StoreError as e:
            raise UsageError(str(e)) from e
    _write_out(text, a.out)
    return 0


def _export_onnx(a: argparse.Namespace) -> int:
    """``ufm runs export ID --format onnx --out model.onnx``: the run's model with its input spec in
    the ONNX metadata (with ``--mean/--std`` the graph takes normalised inputs, as deployed models do)."""
    from ufm.fileio import atomic_write
    from ufm.audits.onnx_model import export_run

    if a.out in (None, "-"):
        raise UsageError("an ONNX model is a binary file: give --out FILE (e.g. --out model.onnx)")
    with open_store(a) as store:
        run_id = _resolve(store, a.id)
        rec = store.get(run_id)
        if rec.status != "done":
            raise UsageError(f"run {run_id} is {rec.status}; only finished (done) runs have a model to export")
        try:
            data = export_run(store, run_id, mean=a.mean, std=a.std)
        except StoreError as e:
            raise UsageError(str(e)) from e
    atomic_write(Path(a.out), data, private=True)  # a model can have memorised private text
    print(f"wrote {a.out} (run {run_id}, {len(data) / 1024:.0f} KB)", file=sys.stderr)
    return 0


def cmd_runs_cancel(a: argparse.Namespace) -> int:
    from ufm.measure.bank import cancel_unneeded_bank

    with open_store(a) as store:
        run_id = _resolve(store, a.id)
        status = store.request_cancel(run_id)
        rec = store.get(run_id)
        # the reference models queued for its verdict, unless another run needs them (none queued
        # at all: nothing to look at); given the record, not its config, whose class would load torch
        pending = store.query("SELECT 1 FROM runs WHERE bank IS NOT NULL AND status IN ('queued', 'running') LIMIT 1")
        bank = cancel_unneeded_bank(store, rec, except_run=run_id) \
            if status in ("cancelled", "running") and not rec.is_reference and pending else []
    msg = {"cancelled": f"run {run_id} cancelled",
           "running": f"run {run_id}: cancel requested; it stops at its next training batch"}
    print(msg.get(status, f"run {run_id} had already finished ({status}); nothing to cancel"))
    if bank:
        print(f"also cancelled the {len(bank)} unfinished reference models queued for its verdict (no other run "
              "needs them)")
    return 0


def cmd_runs_delete(a: argparse.Namespace) -> int:
    with open_store(a) as store:
        run_id = _resolve(store, a.id)
        studies = [r[0] for r in store.query("SELECT DISTINCT study FROM study_runs WHERE run_id = ?", (run_id,))]
        try:
            store.delete_run(run_id, force=a.force)
        except StoreError as e:
            raise UsageError(str(e)) from e
    print(f"deleted run {run_id}" + (f" (it was part of study {', '.join(studies)}, which now lacks it)"
                                     if studies else ""))
    return 0


# ---------------------------------------------------------------------------------- studies

def cmd_studies_list(a: argparse.Namespace) -> int:
    from ufm.runs.studies import list_studies

    with open_store(a) as store:
        df = list_studies(store)
    if a.json:
        print(df.to_json(orient="records", indent=1))
    elif df.empty:
        print(f"no studies in {store.db_path}", file=sys.stderr)
    else:
        print(df.drop(columns=["created"]).to_string(index=False))
    return 0


def cmd_studies_show(a: argparse.Namespace) -> int:
    from ufm.reports.run_report import export_names
    from ufm.runs.studies import summary

    with open_store(a) as store:
        try:
            df = export_names(summary(store, a.name))
        except StoreError as e:
            raise UsageError(str(e)) from e
    if a.json:
        print(df.to_json(orient="records", indent=1))
    else:
        print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def cmd_studies_export(a: argparse.Namespace) -> int:
    from ufm.reports.run_report import export_names, study_html, to_csv
    from ufm.runs.studies import get_study, runs_frame, study_to_dict, summary

    _check_out(a)
    with open_store(a) as store:
        try:
            if a.format == "html":
                text = study_html(store, a.name)
            elif a.format == "csv":
                text = to_csv(runs_frame(store, a.name))
            else:
                text = json.dumps({"study": study_to_dict(get_study(store, a.name)),
                                   "summary": json.loads(export_names(summary(store, a.name)).to_json(orient="records"))}, indent=1)
        except StoreError as e:
            raise UsageError(str(e)) from e
    _write_out(text, a.out)
    return 0


def register(sub: Any) -> None:
    """Add ``runs`` and ``studies`` to the ``ufm`` subcommands."""
    runs = sub.add_parser("runs", help="list, show, export, cancel or delete recorded runs",
                          description="Runs recorded in the store ($UFM_HOME or --home). IDs may be shortened.")
    rs = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    p = rs.add_parser("list", help="all runs, newest first")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON list of the run records")
    fmt.add_argument("--csv", action="store_true", help="one CSV row per run (numbers, config, versions)")
    p.add_argument("--status", choices=STATUSES, default=None, help="only runs with this status")
    p.add_argument("--all", action="store_true",
                   help="also list the reference models one by one (by default: one summary line per bank)")
    p.add_argument("--limit", type=_pos_int, default=None, help="at most N runs")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    p.set_defaults(func=cmd_runs_list)
    p = rs.add_parser("show", help="one run: status, progress, numbers, config")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the run record as JSON")
    p.set_defaults(func=cmd_runs_show)
    p = rs.add_parser("export", help="a run as JSON (full result) or as a self-contained HTML report")
    p.add_argument("id")
    p.add_argument("--format", choices=["json", "html", "onnx"], default="json",
                   help="json (full result), html (report) or onnx (the trained model, for 'ufm audit')")
    p.add_argument("--out", default=None, help="file to write (default stdout)")
    p.add_argument("--mean", type=finite_float, nargs="+", default=None,
                   help="onnx only: export a graph that takes (pixel - mean) / std inputs (one value or one per channel)")
    p.add_argument("--std", type=finite_float, nargs="+", default=None, help="onnx only: see --mean")
    p.set_defaults(func=cmd_runs_export)
    p = rs.add_parser("cancel", help="stop a queued or running run (also one running in another process)")
    p.add_argument("id")
    p.set_defaults(func=cmd_runs_cancel)
    p = rs.add_parser("delete", help="remove a finished run and its artifacts")
    p.add_argument("id")
    p.add_argument("--force", action="store_true",
                   help="also a failed run whose process may still be working on it (if it finishes, it is "
                        "recorded again)")
    p.set_defaults(func=cmd_runs_delete)
    for q in rs.choices.values():
        add_home(q)

    studies = sub.add_parser("studies", help="list, summarise or export studies (groups of runs)",
                             description="Studies recorded in the store ($UFM_HOME or --home).")
    ss = studies.add_subparsers(dest="studies_command", metavar="ACTION", required=True)
    p = ss.add_parser("list", help="all studies")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_studies_list)
    p = ss.add_parser("show", help="per group: mean M with 95%% interval, share memorised (verdict), accuracy")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_studies_show)
    p = ss.add_parser("export", help="a study as a self-contained HTML report (or CSV of its runs, or JSON)")
    p.add_argument("name")
    p.add_argument("--format", choices=["html", "csv", "json"], default="html")
    p.add_argument("--out", required=True, help="file to write ('-' for stdout)")
    p.set_defaults(func=cmd_studies_export)
    for q in ss.choices.values():
        add_home(q)
