"""A contact sheet: titled sections of image tiles, each with a few lines of text, as one PNG.

Drawing only (matplotlib's Agg canvas, no display needed); what goes on it is chosen by
pipeline.inspect. `draw` returns what it drew, tile by tile, so a test can check that the sheet
shows the samples it should.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KEPT, DROPPED, NEUTRAL = "#1a7f37", "#cf222e", "#222222"


@dataclass
class Tile:
    image: np.ndarray | None  # (H, W) or (H, W, C): uint8, or float (scaled to its own range)
    text: str  # a few short lines; long ones are wrapped
    row: int | None = None  # the index row shown (None: a synthetic image)
    color: str = NEUTRAL  # of the text: KEPT, DROPPED or NEUTRAL


@dataclass
class Section:
    title: str
    grid: list[list[Tile | None]] = field(default_factory=list)  # rows of tiles (None: an empty cell)


def _displayable(img: np.ndarray) -> tuple[np.ndarray, dict]:
    """An image as imshow takes it: grey with a fixed 0..255 range, float images min-max scaled."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        lo, hi = np.nanmin(a), np.nanmax(a)
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return a, ({"cmap": "gray", "vmin": 0, "vmax": 1} if a.ndim == 2 else {})
    return a, ({"cmap": "gray", "vmin": 0, "vmax": 255} if a.ndim == 2 else {})


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines = []
    for part in text.split("\n"):
        lines += textwrap.wrap(part, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 1)] + "…"
    return "\n".join(lines)


def draw(sections: list[Section], title: str, out: Path, *, tile: float = 1.25, text_lines: int = 3,
         wrap: int = 22) -> list[Tile]:
    """Write the sheet to `out` (PNG); returns the tiles drawn, in reading order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max([len(r) for s in sections for r in s.grid] + [1])
    text_h, head_h, pad = 0.14 * text_lines + 0.05, 0.3, 0.1
    rows_h = sum(head_h + len(s.grid) * (tile + text_h) for s in sections)
    width, height = cols * (tile + pad) + pad, rows_h + 0.45
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(pad / width, 1 - 0.08 / height, title, ha="left", va="top", fontsize=10, weight="bold")
    y = height - 0.45  # inches from the bottom, moving down
    drawn: list[Tile] = []
    for s in sections:
        fig.text(pad / width, (y - 0.05) / height, s.title, ha="left", va="top", fontsize=8.5, weight="bold")
        y -= head_h
        for grid_row in s.grid:
            y -= tile
            for c, t in enumerate(grid_row):
                if t is None:
                    continue
                x = pad + c * (tile + pad)
                ax = fig.add_axes([x / width, y / height, tile / width, tile / height])
                ax.set_axis_off()
                if t.image is not None:
                    img, kw = _displayable(t.image)
                    ax.imshow(img, interpolation="nearest", **kw)
                fig.text((x + tile / 2) / width, (y - 0.03) / height, _wrap(t.text, wrap, text_lines), ha="center",
                         va="top", fontsize=6.5, color=t.color, linespacing=1.1)
                drawn.append(t)
            y -= text_h
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, out)  # never a half-written sheet
    finally:
        tmp.unlink(missing_ok=True)
    return drawn
