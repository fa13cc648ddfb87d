"""Where an export's files go: written in a local staging folder, then published whole to the destination.

Local destinations get each file by rename (or copy and rename across devices); `s3://` and other
remote ones by one upload per file (`fs.put_file`), so a reader never sees half a file. The staging
folder also holds the external sort's buckets and is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from segbatch.storage import filesystem, protocol_of, unstrip

__all__ = ["Staging"]


class Staging:
    """A local folder for files being written, and :meth:`publish` to move each to `dest_uri/<name>`.

    Args:
        dest_uri: the export's destination folder (local path or URI).
        storage_options: fsspec options for it.
        tmp: where to make the staging folder (default: the system's temporary folder).
    """

    def __init__(self, dest_uri: str, storage_options: dict[str, Any] | None = None, tmp: str | None = None) -> None:
        self.dest_uri = dest_uri.rstrip("/")
        self.fs, root = filesystem(dest_uri, storage_options)
        self.root = root.rstrip("/")
        self.local = protocol_of(dest_uri) == "file"
        self.dir = tempfile.mkdtemp(prefix="segbatch-export-", dir=tmp)
        self.published: list[str] = []

    def path(self, name: str) -> str:
        """Local path of staged file `name` (folders made)."""
        p = os.path.join(self.dir, "files", name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def scratch(self, name: str) -> str:
        """A local folder for temporary files that are never published."""
        p = os.path.join(self.dir, "scratch", name)
        os.makedirs(p, exist_ok=True)
        return p

    def publish(self, name: str) -> str:
        """Move staged file `name` to the destination, whole; returns its URI."""
        src = self.path(name)
        dst = f"{self.root}/{name}"
        if self.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{os.getpid()}"
            shutil.move(src, tmp)
            os.replace(tmp, dst)
        else:
            self.fs.put_file(src, dst)
            os.remove(src)
        uri = unstrip(self.fs, dst)
        self.published.append(uri)
        return uri

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
