"""Which training images and pixels a prediction rests on: TracIn self-influence, canary sweeps over it, GradCAM explanations."""
