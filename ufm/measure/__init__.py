"""Measurement: M and its tests, the reference bank, the calibrated verdict, statistics."""
