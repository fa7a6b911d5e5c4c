"""What every ``ufm`` verb shares: the one-line usage error, argument types, the experiment flags
and their :class:`~ufm.core.experiment.ExperimentConfig`, progress on stderr, ``--out`` checks and the
run store of ``--home``.

Verb modules import from here and from the rest of ``ufm``, never from ``ufm.cli`` or from one
another, so any of them may be imported on its own.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from ufm.fileio import check_writable
from ufm.limits import MAX_CANDIDATES, MAX_FEATURE_SIDE, MAX_OOD_SIZE, MAX_REPEATS
from ufm.runs.store import Store, StoreError


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def int_in(lo: int, hi: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]``. argparse puts the flag in front of the
    message, so ``--seed -1`` ends as ``argument --seed: must be >= 0, got -1``."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}{why}, got {v}")
        return v
    parse.__name__ = f"int_in_{lo}_{hi}"
    return parse


def finite_float(s: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused with the flag's name)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return v


_nonneg_int = int_in(0)
_pos_int = int_in(1)


def add_data_group(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "data" flags of one experiment (dataset, data dir, training and inference set sizes)."""
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="mnist",
                   help="mnist, fashion-mnist, cifar10, chest-xray, or a path (folder with train.npz/test.npz, "
                        "or a folder of class sub-folders)")
    d.add_argument("--data-dir", default=None, help="where datasets live (default $UFM_DATA_DIR or ~/.cache/ufm/data)")
    d.add_argument("--train-size", type=_pos_int, default=None, help="use N training images (a seeded subset keeping every class in proportion)")
    d.add_argument("--ood-size", type=int_in(2, MAX_OOD_SIZE), default=1000,
                   help=f"number of out-of-distribution inference images (2..{MAX_OOD_SIZE})")
    d.add_argument("--ood-source", default=None, help="inference set (default: the paper's choice)")
    return d


def add_training_group(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model and training" flags (architecture, regularisers, budget, DP-SGD)."""
    m = p.add_argument_group("model and training")
    m.add_argument("--arch", default="mlp", choices=["mlp", "cnn1", "cnn2", "densenet100"])
    m.add_argument("--regulariser", "--regularizer", default="none",
                   help="comma-separated: none,dropout,augment,batchnorm,weight-decay,dp-sgd")
    m.add_argument("--epochs", type=_pos_int, default=500, help="maximum epochs (early stopping ends sooner)")
    m.add_argument("--patience", type=_pos_int, default=10, help="early-stopping patience in epochs")
    m.add_argument("--lr", type=finite_float, default=None, help="learning rate (default: the paper's for --arch)")
    m.add_argument("--batch-size", type=_pos_int, default=None, help="batch size (default: the paper's for --arch)")
    m.add_argument("--dropout", type=finite_float, default=0.5, help="drop probability with --regulariser dropout")
    m.add_argument("--weight-decay", type=finite_float, default=5e-4, help="Adam weight decay with weight-decay")
    add_dp_flags(m)
    return m


def add_repeats_seed_device(g: argparse._ArgumentGroup) -> None:
    """``--repeats``, ``--seed`` and ``--device``, in group ``g``."""
    g.add_argument("--repeats", type=int_in(1, MAX_REPEATS), default=1,
                   help=f"R random features per inference image (1..{MAX_REPEATS})")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (>= 0)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")


def training_kwargs(a: argparse.Namespace) -> dict:
    """The ExperimentConfig settings of :func:`add_data_group`, :func:`add_training_group` and
    :func:`add_repeats_seed_device` (DP-SGD apart: :func:`dp_from_args`)."""
    return dict(dataset=a.dataset, data_dir=a.data_dir, arch=a.arch,
                regularisers=tuple(r.strip() for r in a.regulariser.split(",") if r.strip()),
                dropout=a.dropout, weight_decay=a.weight_decay, epochs=a.epochs, patience=a.patience, lr=a.lr,
                batch_size=a.batch_size, train_size=a.train_size, ood_source=a.ood_source, ood_size=a.ood_size,
                repeats=a.repeats, seed=a.seed, device=a.device)


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """Flags that describe one experiment (shared by measure, sweep-canaries, influence, explain)."""
    add_data_group(p)
    add_training_group(p)
    f = p.add_argument_group("feature")
    f.add_argument("--feature", default="A", help="a glyph (A, X, plus, ...), text:JOHN DOE, or an image path")
    f.add_argument("--feature-size", type=int_in(1, MAX_FEATURE_SIDE), default=None,
                   help="glyph/image size m (m x m), or the text height (default 5 for glyphs, 7 for text); "
                        "at most the image size")
    f.add_argument("--offset", type=_nonneg_int, nargs=2, metavar=("ROW", "COL"), default=(1, 1),
                   help="top-left pixel of the feature (default 1 1, as in the paper)")
    f.add_argument("--intensity", type=finite_float, default=1.0, help="feature brightness in (0, 1]")
    c = p.add_argument_group("canary")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--canary-index", type=_nonneg_int, nargs="+", metavar="N",
                   help="training-set indices of the canary images (default 0)")
    g.add_argument("--canary", choices=["random"], help="random canaries (how many: --canaries)")
    g.add_argument("--no-canary", action="store_true", help="the clean control: no image carries the feature")
    g.add_argument("--canary-class", type=_nonneg_int, metavar="C", help="canaries drawn from class C")
    c.add_argument("--canaries", type=_pos_int, default=1, metavar="K", help="canary frequency for random/class")
    s = p.add_argument_group("score")
    s.add_argument("--candidates", type=int_in(1, MAX_CANDIDATES, " (each candidate is scored on every inference image)"),
                   default=99, help=f"K candidate features for the exposure test (1..{MAX_CANDIDATES})")
    # = ufm.core.canary.CANDIDATE_KINDS, spelt out so --help does not import torch
    s.add_argument("--candidate-kind", default="auto",
                   choices=["auto", "permute", "strings", "strokes", "shift", "bernoulli", "uniform"],
                   help="candidate family of the exposure test; auto = by the feature's kind (text: strings, "
                        "glyph or drawing: strokes, image: permute)")
    add_repeats_seed_device(s)


def config_from_args(a: argparse.Namespace):
    """Build an :class:`~ufm.core.experiment.ExperimentConfig` from parsed flags."""
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import parse_feature_spec

    if a.no_canary:
        canary = CanaryChoice("none", ())
    elif a.canary_class is not None:
        canary = CanaryChoice("class", (), count=a.canaries, label=a.canary_class)
    elif a.canary == "random":
        canary = CanaryChoice("random", (), count=a.canaries)
    else:
        canary = CanaryChoice("index", tuple(a.canary_index or (0,)))
    feature = parse_feature_spec(a.feature, a.feature_size, offset=tuple(a.offset), intensity=a.intensity)
    dp = dp_from_args(a)
    return ExperimentConfig(feature=feature, canary=canary, candidates=a.candidates, candidate_kind=a.candidate_kind,
                            **training_kwargs(a)).with_dp(dp)


def dp_from_args(a: argparse.Namespace):
    """The DP-SGD settings of ``--dp-epsilon`` / ``--dp-noise`` / ``--dp-clip`` / ``--dp-delta``; with
    neither epsilon nor noise given, the dashboard's default target epsilon (``ufm.core.train.DEFAULT_DP``),
    so that "dp-sgd" means the same privacy from the CLI as from any page."""
    from ufm.core.dp import DEFAULT_DP, DPConfig

    if a.dp_epsilon is not None:
        return DPConfig(noise_multiplier=None, target_epsilon=a.dp_epsilon, delta=a.dp_delta, max_grad_norm=a.dp_clip)
    if a.dp_noise is not None:
        return DPConfig(noise_multiplier=a.dp_noise, target_epsilon=None, delta=a.dp_delta, max_grad_norm=a.dp_clip)
    return DPConfig(noise_multiplier=DEFAULT_DP.noise_multiplier, target_epsilon=DEFAULT_DP.target_epsilon,
                    delta=a.dp_delta, max_grad_norm=a.dp_clip)


def add_dp_flags(m: argparse.ArgumentParser) -> None:
    """The DP-SGD flags of ``measure`` and ``privacy-audit`` (one definition, one default)."""
    from ufm.core.dp import DEFAULT_DP

    m.add_argument("--dp-noise", type=finite_float, default=None,
                   help="DP-SGD noise multiplier (instead of --dp-epsilon)")
    m.add_argument("--dp-epsilon", type=finite_float, default=None,
                   help=f"DP-SGD target epsilon over the epoch budget (default {DEFAULT_DP.target_epsilon:g} "
                        "when --dp-noise is not given either; the dashboard's default too)")
    m.add_argument("--dp-clip", type=finite_float, default=DEFAULT_DP.max_grad_norm,
                   help="DP-SGD per-example clipping norm")
    m.add_argument("--dp-delta", type=finite_float, default=DEFAULT_DP.delta, help="DP-SGD delta")


class StderrProgress:
    """Progress lines on stderr: one per epoch (overwritten in place on a terminal)."""

    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, p) -> None:
        if self.quiet:
            return
        if p.phase == "train":
            line = (f"epoch {p.epoch}/{p.max_epochs}  train loss {p.train_loss:.4f}  "
                    f"val loss {p.val_loss:.4f}  val acc {100 * p.val_acc:.1f}%")
            self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        else:
            self.stream.write(("\n" if self.tty else "") + f"[{p.phase}] {p.message}\n")
        self.stream.flush()


def check_out_dir(out: str | None, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be made or written (it is a file, or its parent is
    read-only) before any work starts."""
    if out is not None:
        from ufm.fileio import check_out_dir as check

        check(out, what=flag)


def check_out(out: str | None, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written (a folder, a missing or read-only folder)
    before any work starts; ``None`` and ``-`` (stdout) pass."""
    if out not in (None, "-"):
        check_writable(out, what=flag)


def add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=None, metavar="DIR",
                   help="ufm home holding the run database and artifacts (default $UFM_HOME, else "
                        "~/.local/share/ufm)")


def open_store(a: argparse.Namespace) -> Store:
    """The store of ``--home`` / ``$UFM_HOME``; its problems become one-line CLI errors."""
    try:
        return Store(getattr(a, "home", None))
    except StoreError as e:
        raise UsageError(str(e)) from e
