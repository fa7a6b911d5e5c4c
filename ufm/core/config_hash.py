"""The run cache's key of a config, from its plain data: :meth:`ufm.core.experiment.ExperimentConfig.key`
and the torch-free readers of stored configs (:func:`ufm.measure.bank_keys.stored_bank_key`, used by
``ufm runs list``) must hash alike, so the hash is written once, here, without torch."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(d: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``d`` as sorted JSON (``d``: a config's ``to_dict()`` without
    ``data_dir``, which does not change the numbers)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
