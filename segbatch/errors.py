"""Per-item failures as data, and the job-level errors that stop a run before work starts."""

from __future__ import annotations

__all__ = ["ERROR_CLASSES", "ItemError", "JobError", "first_line"]

#: Error classes an item row may carry (column `error_class`).
ERROR_CLASSES = (
    "unreadable",  # the object could not be fetched (missing, denied, storage failure after retries)
    "not_an_image",  # bytes are not a recognised image format
    "truncated",  # a recognised format whose data ends early or is corrupt
    "too_large",  # refused by input.max_bytes / input.max_pixels before decoding
    "unsupported",  # decodable in principle, but not a mode/format we can turn into RGB
    "unsafe_key",  # the input key would place an output outside the output prefix
    "model_failed",  # the model raised on this image
    "write_failed",  # the mask could not be written
)


class ItemError(Exception):
    """One item could not be processed; becomes a row with `status="error"`."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


class JobError(RuntimeError):
    """A problem with the whole job (weights, storage, resources); reported as one line, exit 1."""


def first_line(e: BaseException) -> str:
    """An exception's first message line (error rows and one-line job errors stay one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
