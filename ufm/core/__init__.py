"""The science core: unique features, canary stamping, data, models, training, one experiment."""
