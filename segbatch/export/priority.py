"""`review_priority`: which images a person should look at first (higher = sooner).

For one image, over the objects an export keeps (instances at or above `--min-score`; for semantic
outputs, one object per class present):

    uncertainty  = 1 - top score                (instance; 0 for semantic masks, which carry no score;
                                                 EMPTY_UNCERTAINTY when nothing was found)
    tiny         = objects of at most TINY_AREA pixels / objects    (0 when there are none)
    disagreement = a several-model job's `layer_disagreement`: 1 - IoU of the image's semantic foreground
                   (label != 0) and the union of its instance masks, computed in the predict actor,
                   where both layers' results meet (`models.predictor.LayerPredictor`); both layers'
                   rows carry it. 0 for one-model outputs, and where only one layer ran (a rerun).

    review_priority = 0.5 · uncertainty + 0.3 · tiny + 0.2 · disagreement       (in [0, 1])

Images are reviewed in descending priority; ties keep commit order. TINY_AREA is the area of
`segbatch eval`'s `APtiny` range (24 × 24 px), so "tiny" means the same thing in both places.

Example:
    >>> import numpy as np
    >>> p = review_priority(np.array([0.9, np.nan]), np.array([2, 0]), np.array([1, 0]))
    >>> [round(float(v), 3) for v in p]
    [0.2, 0.25]
"""

from __future__ import annotations

import numpy as np

from segbatch.evaluate import TINY_SIDE

__all__ = ["EMPTY_UNCERTAINTY", "TINY_AREA", "WEIGHTS", "review_priority"]

#: Objects of at most this many pixels count as tiny (same as `segbatch eval`'s APtiny).
TINY_AREA = TINY_SIDE * TINY_SIDE
#: The uncertainty of an image in which nothing was kept: a miss is as likely as a true empty image.
EMPTY_UNCERTAINTY = 0.5
WEIGHTS = {"uncertainty": 0.5, "tiny": 0.3, "disagreement": 0.2}


def review_priority(
    top_score: np.ndarray, objects: np.ndarray, tiny: np.ndarray, disagreement: np.ndarray | None = None
) -> np.ndarray:
    """Per image: the formula in the module docstring (float32).

    Args:
        top_score: the highest kept score per image; NaN where there is none (semantic, or no object).
        objects: kept objects per image.
        tiny: kept objects of at most :data:`TINY_AREA` pixels per image.
        disagreement: per image, in [0, 1]; None (all 0) for a one-model output.
    """
    objects = np.asarray(objects, dtype=np.float64)
    top = np.asarray(top_score, dtype=np.float64)
    uncertainty = np.where(np.isnan(top), 0.0, 1.0 - np.nan_to_num(top, nan=1.0))
    uncertainty = np.where(objects == 0, EMPTY_UNCERTAINTY, uncertainty)
    tiny_share = np.asarray(tiny, dtype=np.float64) / np.maximum(objects, 1.0)
    d = np.zeros_like(objects) if disagreement is None else np.asarray(disagreement, dtype=np.float64)
    out = WEIGHTS["uncertainty"] * uncertainty + WEIGHTS["tiny"] * tiny_share + WEIGHTS["disagreement"] * d
    return np.clip(out, 0.0, 1.0).astype(np.float32)
