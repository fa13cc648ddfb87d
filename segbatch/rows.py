"""Columns every stage shares: object arrays, and the per-row status / error class / error message.

Each stage reads the three status columns of its batch, marks the rows it fails, and writes them back
(:class:`RowStatus`); a row that failed earlier stays failed and passes through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RowStatus", "concat_rows", "object_array", "split_rows", "take_rows"]


def object_array(values: list[Any]) -> np.ndarray:
    """A 1-D object array of the values (keeps ragged arrays as they are; numpy would stack equal shapes)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def take_rows(batch: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """The rows `idx` of a batch (every column, in that order)."""
    return {k: np.asarray(v)[idx] for k, v in batch.items()}


def split_rows(batch: dict[str, Any], column: str) -> list[tuple[Any, dict[str, Any]]]:
    """The batch's rows grouped by the values of `column`: (value, its rows), values in order of first use."""
    values = np.asarray(batch[column], dtype=object)
    return [(v, take_rows(batch, np.flatnonzero(values == v))) for v in dict.fromkeys(values.tolist())]


def concat_rows(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches with the same columns, one after another; object columns stay object arrays (ragged masks)."""
    if len(batches) == 1:
        return batches[0]
    out: dict[str, Any] = {}
    for key in batches[0]:
        parts = [np.asarray(b[key]) for b in batches]
        if any(p.dtype == object for p in parts) or len({p.shape[1:] for p in parts}) > 1:
            out[key] = object_array([v for p in parts for v in p])
        else:
            out[key] = np.concatenate(parts)
    return out


@dataclass(slots=True)
class RowStatus:
    """The `status`, `error_class` and `error` columns of a batch, as lists a stage updates in place."""

    status: list[str]
    error_class: list[str]
    error: list[str]

    @classmethod
    def of(cls, batch: dict[str, Any]) -> "RowStatus":
        """The batch's current columns."""
        return cls(
            [str(s) for s in batch["status"]], [str(s) for s in batch["error_class"]], [str(s) for s in batch["error"]]
        )

    @classmethod
    def all_ok(cls, n: int) -> "RowStatus":
        return cls(["ok"] * n, [""] * n, [""] * n)

    def ok(self, i: int) -> bool:
        return self.status[i] == "ok"

    def fail(self, i: int, error_class: str, message: str) -> None:
        """Mark row `i` failed."""
        self.status[i], self.error_class[i], self.error[i] = "error", error_class, message

    def into(self, out: dict[str, Any]) -> dict[str, Any]:
        """Write the three columns into a stage's output batch; returns it."""
        out["status"] = np.asarray(self.status, dtype=object)
        out["error_class"] = np.asarray(self.error_class, dtype=object)
        out["error"] = np.asarray(self.error, dtype=object)
        return out
