"""Which candidate features give the exposure test power without false alarms?

Trains MLPs on the first N MNIST training images with 0 (clean control), 1, 10 and 100
canaries of the letter A, then scores *the same trained model* with the Welch t-test and with
the exposure test under each candidate kind (``permute``: rearrangements of the feature's own
pixels; ``bernoulli``: Bernoulli(0.5) patterns; ``uniform``). Prints one row per model and the
share of "significant" calls per setting.

    python benchmarks/exposure_power.py --data-dir ../shared/data --seeds 3
"""

from __future__ import annotations

import argparse
import time

from ufm.canary import CanaryChoice
from ufm.experiment import ExperimentConfig, run_experiment
from ufm.scores import memorisation_score

KINDS = ("permute", "bernoulli", "uniform")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--settings", default="clean,1,10,100",
                    help="comma-separated: clean and/or canary counts (random canaries)")
    ap.add_argument("--candidates", type=int, default=99)
    ap.add_argument("--alpha", type=float, default=0.05)
    a = ap.parse_args()

    settings = []
    for s in a.settings.split(","):
        if s == "clean":
            settings.append(("clean", CanaryChoice("none", ())))
        else:
            settings.append((f"{s} canar{'y' if s == '1' else 'ies'}", CanaryChoice("random", (), count=int(s))))
    calls: dict[tuple[str, str], list[bool]] = {}
    print(f"{'setting':<13}{'seed':>5}{'M':>10}{'t-test p':>11}" + "".join(f"{k + ' p':>13}" for k in KINDS))
    t0 = time.perf_counter()
    for name, canary in settings:
        for seed in range(a.seeds):
            cfg = ExperimentConfig(dataset="mnist", data_dir=a.data_dir, train_size=a.train_size, canary=canary,
                                   seed=seed, candidates=a.candidates, device="cpu")
            res = run_experiment(cfg)
            row = f"{name:<13}{seed:>5}{res.M:>10.4f}{res.score.p_value:>11.2g}"
            calls.setdefault((name, "t-test"), []).append(res.score.p_value < a.alpha)
            for kind in KINDS:
                s = memorisation_score(res.model, _ood(cfg), cfg.feature, candidates=a.candidates,
                                       candidate_kind=kind, seed=seed)
                calls.setdefault((name, kind), []).append(s.exposure_p_value < a.alpha)
                row += f"{s.exposure_p_value:>13.3f}"
            print(row, flush=True)
    print(f"\nshare called significant at alpha={a.alpha} ({a.seeds} seeds, K={a.candidates}, "
          f"{a.train_size} MNIST images, MLP; {time.perf_counter() - t0:.0f} s)")
    print(f"{'setting':<13}" + "".join(f"{k:>11}" for k in ("t-test", *KINDS)))
    for name, _ in settings:
        print(f"{name:<13}" + "".join(f"{sum(calls[(name, k)])}/{len(calls[(name, k)])}".rjust(11)
                                      for k in ("t-test", *KINDS)))


def _ood(cfg: ExperimentConfig):
    from ufm.experiment import inference_images
    return inference_images(cfg).x


if __name__ == "__main__":
    main()
