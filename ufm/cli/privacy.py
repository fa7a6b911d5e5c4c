"""CLI verb ``ufm privacy-audit``: a one-run epsilon lower bound from many unique features
(:mod:`ufm.audits.privacy_audit`). The audit's model is trained as a run in the store of ``--home``:
``ufm runs list`` shows it, ``ufm runs cancel`` stops it, an identical audit reuses it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ufm.fileio import atomic_write as write_atomic
from ufm.limits import MAX_FEATURE_SIDE
from ufm.cli.common import (StderrProgress, add_data_group, add_repeats_seed_device, add_training_group, dp_from_args,
                            _nonneg_int, check_out, finite_float, int_in, open_store, training_kwargs)


def audit_config_from_args(a: argparse.Namespace):
    """Build a :class:`~ufm.audits.privacy_audit.PrivacyAuditConfig` from parsed flags."""
    from ufm.core.experiment import ExperimentConfig
    from ufm.audits.privacy_audit import PrivacyAuditConfig

    exp = ExperimentConfig(**training_kwargs(a)).with_dp(dp_from_args(a))
    if a.guess == "reconstruction" and a.k_plus is not None and a.k_minus is None:
        a.k_minus = 0  # reconstruction makes only "which candidate" guesses: --k-plus is the guess count
    if a.guess == "membership" and a.choices not in (None, 2):
        raise ValueError(f"--choices {a.choices} needs --guess reconstruction (a membership guess has 2 choices)")
    if (a.k_plus is None) != (a.k_minus is None):
        raise ValueError("give both --k-plus and --k-minus (fixed guess counts) or neither (Bonferroni over the grid)")
    return PrivacyAuditConfig(exp, canaries=a.canaries, features=a.features, feature_size=a.feature_size,
                              text_length=a.text_length, offset=tuple(a.offset), placement=a.placement,
                              out_mode=a.out_mode, score=a.score, delta=a.delta, confidence=a.confidence,
                              k_plus=a.k_plus, k_minus=a.k_minus, guess=a.guess,
                              choices=a.choices if a.choices is not None else (10 if a.guess == "reconstruction" else 2))


def cmd_privacy_audit(a: argparse.Namespace) -> int:
    from ufm.audits.privacy_audit import run_privacy_audit
    from ufm.core.experiment import check_data

    check_out(a.out)
    cfg = audit_config_from_args(a)
    check_data(cfg.run_config())  # sizes beyond the data, m beyond the training set: before a run is recorded
    store = open_store(a)
    res = run_privacy_audit(cfg, progress=StderrProgress(a.quiet), store=store)
    print(f"run {res.run_id} in {store.home} ('ufm runs show {res.run_id}')", file=sys.stderr)
    payload = res.to_json(indent=1)
    stream = sys.stderr if a.out == "-" else sys.stdout
    if a.out == "-":
        print(payload)
    elif a.out:
        write_atomic(Path(a.out), payload, private=True)  # names the feature: 0600
    for line in res.summary_lines():
        print(line, file=stream)
    if a.out and a.out != "-":
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "privacy-audit", help="one-run privacy audit: an epsilon lower bound from many unique features",
        description="Draw m distinct unique features on m distinct training images, include each with "
                    "probability 1/2, train ONE model, score every feature (--score), guess IN for the highest "
                    "scores and OUT for the lowest, and turn the correct guesses into a lower bound on the "
                    "differential-privacy epsilon (Steinke, Nasr & Jagielski 2023), beside the f-DP analysis of "
                    "the same guesses (Mahloujifar, Melis & Chaudhuri 2025). --guess reconstruction instead gives "
                    "each of the m slots one of --choices K candidate features and guesses which (f-DP analyses "
                    "only: the one proved for k-ary guesses in one run). The model is a run in the "
                    "store of --home: 'ufm runs list' shows it, 'ufm runs cancel' stops it, and an identical "
                    "audit reuses it.")
    add_data_group(p)
    add_training_group(p)
    a = p.add_argument_group("audit")
    a.add_argument("--canaries", type=int, required=True, metavar="M",
                   help="m >= 2 distinct features on m distinct training images (100 or more for a useful bound)")
    a.add_argument("--features", choices=["random", "text"], default="random",
                   help="random: distinct random binary S x S patterns; text: distinct random strings S pixels tall")
    a.add_argument("--feature-size", type=int_in(1, MAX_FEATURE_SIDE), default=7, metavar="S",
                   help="pattern side or text height in pixels (default 7)")
    a.add_argument("--text-length", type=int_in(1, 16), default=3, help="letters per string with --features text")
    a.add_argument("--offset", type=_nonneg_int, nargs=2, metavar=("ROW", "COL"), default=(1, 1))
    a.add_argument("--placement", choices=["fixed", "random"], default="random",
                   help="random (default): each feature at its own seeded place; fixed: every feature at --offset")
    a.add_argument("--out-mode", choices=["clean", "removed"], default="clean",
                   help="OUT canary: image trained on without its feature (clean) or left out (removed)")
    a.add_argument("--score", choices=["label-gain", "M"], default="label-gain",
                   help="label-gain (default): the feature's pull towards its canary's class on the inference "
                        "images; M: the paper's label-free X_u - X_r (weaker: README, privacy audit)")
    a.add_argument("--guess", choices=["membership", "reconstruction"], default="membership",
                   help="membership (default): guess IN or OUT per canary; reconstruction: guess which of --choices "
                        "candidate features each slot carries (a correct guess is worth more)")
    a.add_argument("--choices", type=int_in(2, 100), default=None, metavar="K",
                   help="candidate features per slot with --guess reconstruction (default 10)")
    a.add_argument("--delta", type=finite_float, default=1e-5, help="delta of the bound (default 1e-5)")
    a.add_argument("--confidence", type=finite_float, default=0.95, help="confidence of the bound (default 0.95)")
    a.add_argument("--k-plus", type=_nonneg_int, default=None, help="fixed IN guesses (with --k-minus; else Bonferroni grid); "
                                                                            "reconstruction: the guess count")
    a.add_argument("--k-minus", type=_nonneg_int, default=None, help="fixed OUT guesses")
    add_repeats_seed_device(a)
    p.add_argument("--out", default=None, help="write the audit JSON here ('-' for stdout)")
    p.add_argument("--save", action="store_true",
                   help="accepted for scripts written for earlier versions: every audit is now kept as a run "
                        "under the ufm home (the dashboard lists it)")
    p.add_argument("--home", default=None, metavar="DIR",
                   help="ufm home whose run store trains and keeps the audit's model (default $UFM_HOME)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_privacy_audit)
