"""ufm: measure whether a neural network memorises a unique feature it saw once.

The science is importable without Streamlit: features, canary stamping, data, models,
training, scores, influence and explanations, and one-call experiments.
"""

from ufm.version import __version__

__all__ = [
    "ExperimentConfig",
    "Result",
    "run_experiment",
    "Feature",
    "glyph",
    "text_feature",
    "image_feature",
    "grid_feature",
    "CanaryChoice",
    "memorisation_score",
    "__version__",
]


def __getattr__(name: str):
    # Lazy re-exports: `import ufm` stays cheap (the CLI's --help must not wait for torch).
    if name in ("ExperimentConfig", "Result", "run_experiment"):
        from ufm.core import experiment
        return getattr(experiment, name)
    if name in ("Feature", "glyph", "text_feature", "image_feature", "grid_feature"):
        from ufm.core import features
        return getattr(features, name)
    if name == "CanaryChoice":
        from ufm.core.canary import CanaryChoice
        return CanaryChoice
    if name == "memorisation_score":
        from ufm.measure.scores import memorisation_score
        return memorisation_score
    raise AttributeError(f"module 'ufm' has no attribute {name!r}")
