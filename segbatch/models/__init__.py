"""Models: the zoo (builders by name), weights (resolve + verify) and the predictor (the actor).

Names are imported on first use, so `segbatch.models.archs` (and the job spec that checks names
against it) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Predictor", "ResolvedWeights", "build_model", "resolve_weights"]

_WHERE = {
    "Predictor": "segbatch.models.predictor",
    "ResolvedWeights": "segbatch.models.source",
    "resolve_weights": "segbatch.models.weights",
    "build_model": "segbatch.models.zoo",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'segbatch.models' has no attribute '{name}'")
