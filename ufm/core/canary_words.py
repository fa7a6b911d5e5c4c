"""A canary choice in words, without torch: ``ufm runs list`` describes every run's canaries and
must start in a fraction of a second (:mod:`ufm.core.canary`, where :class:`CanaryChoice` lives,
imports torch)."""

from __future__ import annotations

from typing import Sequence


def describe_canaries(mode: str, indices: Sequence[int] = (), count: int = 1, label: int | None = None) -> str:
    """``"canary at index 0"``, ``"3 random canaries"``, ``"2 canaries of class 1"`` or the control."""
    if mode == "none":
        return "no canary (clean control)"
    if mode == "index":
        return f"canary at index {', '.join(map(str, indices))}"
    if mode == "random":
        return f"{count} random canar{'y' if count == 1 else 'ies'}"
    return f"{count} canar{'y' if count == 1 else 'ies'} of class {label}"
