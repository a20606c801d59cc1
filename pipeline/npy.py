"""Row access to [N, D] .npy files that need not fit in memory (a million 512-d float32 rows are 2 GiB).

`NpyRows` reads rows as copies, each read through its own memory map that is closed right after:
the file's pages stay in the OS page cache (shared, reclaimable) but leave the process, so its
resident memory holds the copies a caller keeps and nothing more. A plain `np.load(mmap_mode="r")`
would keep every page it ever touched mapped, so one pass over the file makes the process look
(and, under memory pressure, behave) as if it held the whole array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CurateError


class NpyRows:
    """An [N, D] .npy, or a subset of its rows (`rows`, ascending file rows), indexed like an array
    of its rows: x[a:b] and x[positions] give copies in the stored dtype; len, shape, dtype, ndim."""

    def __init__(self, path: str | Path, rows: np.ndarray | None = None):
        self.path = Path(path)
        mm = self._map()
        if mm.ndim != 2:
            raise CurateError(f"{self.path.name} must be [N, D], got shape {mm.shape}")
        self._n, self.dim, self.dtype = mm.shape[0], mm.shape[1], mm.dtype
        del mm
        self.rows = None if rows is None else np.asarray(rows, np.int64)

    def _map(self) -> np.memmap:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CurateError(f"cannot read {self.path}: {exc}") from None

    ndim = 2

    def __len__(self) -> int:
        return self._n if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def take(self, positions) -> "NpyRows":
        """The rows at these positions of this view, as a view of the same file."""
        base = np.arange(self._n) if self.rows is None else self.rows
        return NpyRows(self.path, base[np.asarray(positions, np.int64)])

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, tuple):
            raise TypeError("NpyRows takes rows only (a slice or positions), e.g. x[a:b] or x[[3, 5]]")
        file_rows = idx if self.rows is None else self.rows[idx]
        mm = self._map()
        try:
            return np.array(mm[file_rows])
        finally:
            del mm

    def blocks(self, block: int = 65536):
        """(start position, rows) blocks in order, each a copy."""
        for s in range(0, len(self), block):
            yield s, self[s:s + block]


def load_checked(path: str | Path, what: str, rows: np.ndarray | None = None) -> np.ndarray:
    """[N, D] float32 of a .npy (or of its ascending `rows`), read block by block into one array and
    checked finite on the way: the single [N, D] copy of a stage that must hold the embeddings, with
    no temporaries of the whole (a float16 file is not read whole before its float32 copy is made).
    A bad row is one line naming `what` and its row in the file."""
    x = NpyRows(path, rows)
    out = np.empty(x.shape, np.float32)
    for s, block in x.blocks():
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            i = s + int(np.flatnonzero(bad)[0])
            raise CurateError(f"{what} row {i if rows is None else int(rows[i])} is NaN or infinite")
        out[s:s + len(block)] = block
    return out
