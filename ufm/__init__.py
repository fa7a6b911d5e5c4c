"""ufm: measure whether a neural network memorises a unique feature it saw once.

The science is importable without Streamlit: features, canary stamping, data, models,
training, scores, influence and explanations, and one-call experiments.
"""

__version__ = "0.2.0"

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
        from . import experiment
        return getattr(experiment, name)
    if name in ("Feature", "glyph", "text_feature", "image_feature", "grid_feature"):
        from . import features
        return getattr(features, name)
    if name == "CanaryChoice":
        from .canary import CanaryChoice
        return CanaryChoice
    if name == "memorisation_score":
        from .scores import memorisation_score
        return memorisation_score
    raise AttributeError(f"module 'ufm' has no attribute {name!r}")
