"""DP-SGD settings: one definition and one default for every surface (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings (Opacus). Give ``noise_multiplier`` or ``target_epsilon``, not both.

    Attributes:
        noise_multiplier: std of the Gaussian noise relative to ``max_grad_norm``.
        target_epsilon: epsilon to reach after ``max_epochs`` (Opacus picks the noise). DP
            runs always train exactly ``max_epochs`` (no early stopping), so the noise is
            calibrated for the steps that really run.
        delta: the delta of (epsilon, delta)-DP; should be below 1 / training-set size.
        max_grad_norm: per-example gradient clipping norm.
    """

    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DP-SGD needs exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"clipping norm must be > 0, got {self.max_grad_norm}")


# The DP-SGD settings every surface starts from (Train, Compare, Audit privacy, the CLI): one place,
# so the same "dp-sgd" means the same privacy everywhere. A target epsilon rather than a noise
# multiplier: the noise multiplier 1.0 that DPConfig() holds spends epsilon ~31 over a 30-epoch
# quick run on 3,000 images, which is no meaningful privacy, while a target fixes the promise and
# Opacus picks the noise for the epochs that really run.
DEFAULT_DP = DPConfig(noise_multiplier=None, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
# The noise multiplier offered when a user chooses to set the noise instead of a target epsilon.
DEFAULT_NOISE_MULTIPLIER = 1.0
# What a configuration without dp-sgd carries: its DP settings are never used but are part of its
# key (ufm.core.experiment.ExperimentConfig.key), so they must not vary with a page's DP widgets.
NEUTRAL_DP = DPConfig()
