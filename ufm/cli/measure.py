"""CLI verb ``ufm measure``: train one model with the canary, measure M, and record the run in
the store (``--home``), through the cache (``--force`` retrains; ``--references R`` adds the bank
of reference models for the calibrated verdict)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ufm.fileio import atomic_write as write_atomic
from ufm.runs.store import StoreError
from ufm.runs.store.records import export_keys
from ufm.cli.common import (StderrProgress, UsageError, add_experiment_args, add_home, check_out, config_from_args, int_in,
                     open_store)

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig, Result
    from ufm.core.train import ProgressFn
    from ufm.measure.verdict import Verdict


def _references(s: str) -> int:
    from ufm.limits import MAX_REFERENCES  # not ..reference: building the parser must not import torch
    v = int_in(0, MAX_REFERENCES)(s)
    if 0 < v < 19:
        raise argparse.ArgumentTypeError(f"must be 0 or at least 19 (the smallest p-value is 1/(R + 1)), got {v}")
    return v


def summary_lines(result, verdict=None) -> list[str]:
    """What ``ufm measure`` prints: the numbers, the fast test, and the verdict (calibrated when the
    reference bank is complete, else provisional)."""
    s = result.score
    k = len(s.candidate_X)
    fast = (f"fast test ({s.family} candidates): inconclusive: {s.inconclusive_reason}" if s.status == "inconclusive"
            else f"fast test ({s.family} candidates): exposure = {s.exposure:.2f} bits, rank {s.rank} of {k + 1}, "
                 f"p = {s.exposure_p_value:.3g}")
    lines = [
        f"M = {s.M:.5g}  (X_u = {s.X_u:.5g}, X_r = {s.X_r:.5g}; nats)",
        f"paper's t-tests (shown, never decide): Welch p = {s.p_value:.3g}, paired p = {s.p_value_paired:.3g}",
        fast,
    ]
    if verdict is None:
        lines.append(f"verdict: {s.verdict()}")
    else:
        lines.append(f"verdict: {verdict.headline}. {verdict.text}")
        if verdict.calibration:
            lines.append(f"calibration: {verdict.calibration}")
    return lines + [
        *(f"note: {n}" for n in getattr(result, "notes", [])),
        f"trained on {result.n_train} images (+ {result.n_val} for validation)",
        f"canaries: {result.canary_indices[:10]}{' ...' if len(result.canary_indices) > 10 else ''}"
        f"  test accuracy {100 * result.test_accuracy:.2f}%  epochs {result.epochs_trained}"
        f"{'' if result.epsilon is None else f'  DP epsilon spent {result.epsilon:.3g}'}",
    ]


def measure_in_store(a: argparse.Namespace, config: "ExperimentConfig",
                     progress: "ProgressFn | None") -> tuple[str, "Result", bool, "Verdict"]:
    """``ufm measure``'s work: train (or reuse an identical finished run unless ``--force``), record
    the run, and with ``--references R`` train the bank of R clean reference models (once per
    setting) for the calibrated verdict. Returns ``(run_id, result, cached, verdict)``; without a
    complete bank the verdict is the provisional fast test's."""
    from ufm.runs.jobs import measure
    from ufm.measure.bank import DEFAULT_REFERENCES
    from ufm.runs.banks import build_bank, report_bank_progress
    from ufm.core.train import TrainingCancelled
    from ufm.measure.verdict import update_verdict

    references = getattr(a, "references", 0) or 0
    result = None
    with open_store(a) as store:
        try:
            run_id, result, cached = measure(store, config, force=a.force, progress=progress)
            if references:
                build_bank(store, config, references, progress=report_bank_progress(progress))
            # stored with the run: `ufm runs show` and the exports print this same verdict
            verdict = update_verdict(store, run_id, references or DEFAULT_REFERENCES)
        except TrainingCancelled as e:
            raise UsageError(f"{e} (cancelled from 'ufm runs cancel' or the dashboard); nothing was saved") from e
        except Exception as e:
            finished = result if result is not None else getattr(e, "unsaved_result", None)
            if finished is not None:  # trained to the end: never lose it to a store problem
                raise UsageError(f"{' '.join(str(e).split()) or type(e).__name__}; the run had finished: its result "
                                 f"is in {_keep_unrecorded(a, finished)}") from e
            if isinstance(e, StoreError):
                raise UsageError(str(e)) from e
            raise
    return run_id, result, cached, verdict


def _keep_unrecorded(a: argparse.Namespace, result: "Result") -> str:
    """Write a finished result the store could not take (or the work after it failed) to ``--out``,
    or without one to ``ufm-result-<time>.json`` in the working folder; returns the path."""
    import time

    out = a.out if a.out and a.out != "-" else f"ufm-result-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_atomic(Path(out), json.dumps(result.to_dict(), indent=1), private=True)  # names the feature: 0600
    return out


def cmd_measure(a: argparse.Namespace) -> int:
    check_out(a.out)
    config = config_from_args(a)
    # Recorded in the run store; an identical finished run is reused unless --force.
    run_id, result, cached, verdict = measure_in_store(a, config, StderrProgress(a.quiet))
    payload = json.dumps({**export_keys(result.to_dict()), "final_verdict": verdict.to_dict()}, indent=1)
    if a.out == "-":
        print(payload)
    elif a.out:
        write_atomic(Path(a.out), payload, private=True)  # names the feature: 0600
    for line in summary_lines(result, verdict):
        print(line, file=sys.stderr if a.out == "-" else sys.stdout)
    print(f"run {run_id}" + ("  (cached: an identical finished run; nothing trained, --force retrains)" if cached else ""),
          file=sys.stderr if a.out == "-" else sys.stdout)
    if a.out and a.out != "-":
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add ``measure`` to the ``ufm`` subcommands."""
    from ufm.limits import MAX_REFERENCES

    p = sub.add_parser("measure", help="train with a canary and measure memorisation (M score)",
                       description="Train one model with the feature on the canary image(s) and measure M.")
    add_experiment_args(p)
    p.add_argument("--out", default=None, help="write the result JSON here ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_home(p)
    p.add_argument("--force", action="store_true",
                   help="train even when an identical finished run (same config and ufm version) is "
                        "in the store")
    p.add_argument("--references", type=_references, default=0, metavar="R",
                   help="also train R clean reference models (19 to %d, default bank 39; once per training setting, "
                        "shared by every feature, canary and seed) and give the calibrated verdict; "
                        "0 (default) uses a complete bank of 39 already in the store, else the verdict is "
                        "the fast test's, marked provisional" % MAX_REFERENCES)
    p.set_defaults(func=cmd_measure)
