"""A run's `outputs:` folder, synced from a node to the run's storage (`<storage>/runs/<id>/outputs/`).

Rank 0's folder lands in `outputs/`, another node's in `outputs/node-<rank>/`. Only files that are
new or changed since the last sync (size and mtime) are uploaded, each atomically, so a sync every
few minutes costs little and `fetch` never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def outputs_key(node_rank: int) -> str:
    return "outputs" if node_rank == 0 else f"outputs/node-{node_rank}"


class OutputSync:
    def __init__(self, folder: Path, store: Any, log=lambda text: None):
        self.folder = folder
        self.store = store
        self.seen: dict[str, tuple[int, int]] = {}
        self.log = log

    def changed_files(self) -> list[tuple[str, Path, tuple[int, int]]]:
        if not self.folder.is_dir():
            return []
        out = []
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                rel = path.relative_to(self.folder).as_posix()
                stamp = (st.st_size, st.st_mtime_ns)
                if self.seen.get(rel) != stamp:
                    out.append((rel, path, stamp))
        return out

    def sync(self) -> int:
        """Upload what changed; how many files went. Errors are logged, and retried next time."""
        sent = 0
        for rel, path, stamp in self.changed_files():
            try:
                self.store.upload_file(rel, path)
            except Exception as exc:  # noqa: BLE001 - a file being rewritten, a storage hiccup: next round
                self.log(f"outputs: cannot upload {rel}: {exc}")
                continue
            self.seen[rel] = stamp
            sent += 1
        return sent
