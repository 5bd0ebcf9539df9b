"""Line plot to PNG: matplotlib when it imports, else a small pure-Python rasterizer.

The GPU machine that runs ``report.py`` has torch, triton, pytest and pytest-benchmark and nothing
else, so the fallback needs only the standard library (``zlib`` + ``struct`` for the PNG). It
draws axes, a grid, polylines with square markers in distinct colours, a legend by colour swatch,
and text in a built-in 5x7 upper-case bitmap font.
"""

from __future__ import annotations

import math
import struct
import zlib

Series = dict[str, list[tuple[float, float]]]  # name -> [(x, y)], x > 0 (log axis)

COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def plot(
    path: str,
    series: Series,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hline: float | None = None,
    use_matplotlib: bool = True,
) -> str:
    """Write a PNG with one line per series, x on a log2 axis; returns the backend used."""
    if use_matplotlib:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            pass
        else:
            _plot_matplotlib(plt, path, series, title, xlabel, ylabel, hline)
            return "matplotlib"
    _plot_raster(path, series, title, xlabel, ylabel, hline)
    return "builtin"


def _plot_matplotlib(plt, path, series, title, xlabel, ylabel, hline) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.4), dpi=100)
    xs = sorted({x for pts in series.values() for x, _ in pts})
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        color = tuple(c / 255 for c in COLORS[i % len(COLORS)])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", color=color, label=name, ms=4)
    top = max([y for pts in series.values() for _, y in pts] + [0.0])
    if hline is not None and top >= 0.5 * hline:
        ax.axhline(hline, color="0.4", ls="--", lw=1, label=f"{hline:g} (copy)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(int(x)) if x == int(x) else f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(True, color="0.9")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The fallback rasterizer
# --------------------------------------------------------------------------------------------

# 5x7 glyphs, rows top to bottom, '#' = ink. Lower case draws as upper case.
_GLYPHS = {
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "####.|....#|....#|.###.|....#|....#|####.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    " ": ".....|.....|.....|.....|.....|.....|.....",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|.###.|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "%": "##..#|##..#|...#.|..#..|.#...|#..##|#..##",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "/": "....#|....#|...#.|..#..|.#...|#....|#....",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "#": ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#.",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
}
_GLYPH_W, _GLYPH_H, _ADVANCE = 5, 7, 6


class _Canvas:
    def __init__(self, width: int, height: int, bg=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Filled, corners inclusive."""
        x0, x1 = max(0, min(x0, x1)), min(self.w - 1, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h - 1, max(y0, y1))
        if x0 > x1 or y0 > y1:
            return
        row = bytes(color) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            i = 3 * (y * self.w + x0)
            self.px[i : i + len(row)] = row

    def line(self, x0, y0, x1, y1, color, width: int = 1, dash: int = 0) -> None:
        """Bresenham, stamping a width x width square at each step; dash = on/off run length."""
        x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, lo, step = dx + dy, -(width // 2), 0
        while True:
            if not dash or (step // dash) % 2 == 0:
                self.rect(x0 + lo, y0 + lo, x0 + lo + width - 1, y0 + lo + width - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2, step = 2 * err, step + 1
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 1) -> None:
        """Top-left at (x, y)."""
        for k, ch in enumerate(s):
            glyph = _GLYPHS.get(ch) or _GLYPHS.get(ch.upper()) or _GLYPHS["?"]
            gx = x + k * _ADVANCE * scale
            for r, bits in enumerate(glyph.split("|")):
                for c, bit in enumerate(bits):
                    if bit == "#":
                        x0, y0 = gx + c * scale, y + r * scale
                        self.rect(x0, y0, x0 + scale - 1, y0 + scale - 1, color)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        stride = 3 * self.w
        raw = b"".join(
            b"\x00" + bytes(self.px[y * stride : (y + 1) * stride]) for y in range(self.h)
        )
        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def text_width(s: str, scale: int = 1) -> int:
    return len(s) * _ADVANCE * scale - scale


def _y_ticks(need: float, max_ticks: int = 6) -> tuple[float, int]:
    """(step, count): the smallest 1, 2, 2.5, 5 x 10^k step covering ``need`` in <= max_ticks."""
    need = need if need > 0 else 1.0
    exp = 10 ** math.floor(math.log10(need / max_ticks))
    for m in (1, 2, 2.5, 5, 10, 20):
        step = m * exp
        if math.ceil(need / step - 1e-9) <= max_ticks:
            return step, max(1, math.ceil(need / step - 1e-9))
    return 20 * exp, max_ticks


def _fmt(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:g}"


def _plot_raster(path, series, title, xlabel, ylabel, hline) -> None:
    width, height = 960, 560
    left, right, top, bottom = 70, 250, 60, 70  # plot area margins; legend on the right
    cv = _Canvas(width, height)
    px0, px1, py0, py1 = left, width - right, top, height - bottom  # py0 top, py1 bottom

    xs = sorted({x for pts in series.values() for x, _ in pts})
    ys = [y for pts in series.values() for _, y in pts]
    lx = [math.log2(x) for x in xs] or [0.0, 1.0]
    lxmin, lxmax = min(lx), max(lx)
    if lxmax - lxmin < 1e-9:
        lxmin, lxmax = lxmin - 1, lxmax + 1
    pad = 0.06 * (lxmax - lxmin)
    lxmin, lxmax = lxmin - pad, lxmax + pad
    # The reference line sets the scale only when the data come near it.
    top_value = max(ys + [0.0])
    if hline is not None and top_value >= 0.5 * hline:
        top_value = max(top_value, hline)
    y_step, n_ticks = _y_ticks(1.05 * top_value)
    ymax = y_step * n_ticks

    def X(x: float) -> float:
        return px0 + (math.log2(x) - lxmin) / (lxmax - lxmin) * (px1 - px0)

    def Y(y: float) -> float:
        return py1 - y / ymax * (py1 - py0)

    grid, axis, ink = (228, 228, 228), (60, 60, 60), (20, 20, 20)
    # y grid + labels
    for k in range(n_ticks + 1):
        v = y_step * k
        y = int(round(Y(v)))
        cv.line(px0, y, px1, y, grid)
        label = _fmt(round(v, 6))
        cv.text(px0 - 8 - text_width(label), y - 3, label, ink)
    # x ticks at the measured vocabulary sizes, skipping labels that would overlap
    last_end = -1e9
    for x in xs:
        xp = int(round(X(x)))
        cv.line(xp, py0, xp, py1, grid)
        cv.line(xp, py1, xp, py1 + 5, axis)
        label = _fmt(x)
        start = xp - text_width(label) // 2
        if start > last_end + 6:
            cv.text(start, py1 + 10, label, ink)
            last_end = start + text_width(label)
    cv.line(px0, py1, px1, py1, axis)
    cv.line(px0, py0, px0, py1, axis)
    if hline is not None and hline <= ymax:
        cv.line(px0, Y(hline), px1, Y(hline), (110, 110, 110), dash=6)

    for i, (_name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = sorted(pts)
        for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
            cv.line(X(xa), Y(ya), X(xb), Y(yb), color, width=3)
        for x, y in pts:
            xp, yp = int(round(X(x))), int(round(Y(y)))
            cv.rect(xp - 4, yp - 4, xp + 4, yp + 4, color)

    cv.text((width - text_width(title, 2)) // 2, 18, title, ink, scale=2)
    cv.text((px0 + px1 - text_width(xlabel)) // 2, py1 + 32, xlabel, ink)
    cv.text(8, py0 - 22, ylabel, ink)
    lx0, ly = px1 + 24, py0 + 10
    for i, name in enumerate(series):
        color = COLORS[i % len(COLORS)]
        cv.rect(lx0, ly + 22 * i, lx0 + 13, ly + 22 * i + 13, color)
        cv.text(lx0 + 22, ly + 22 * i + 3, name, ink)
    if hline is not None and hline <= ymax:
        yy = ly + 22 * len(series) + 6
        cv.line(lx0, yy, lx0 + 13, yy, (110, 110, 110), dash=3)
        cv.text(lx0 + 22, yy - 3, f"{_fmt(hline)} (copy)", ink)

    with open(path, "wb") as f:
        f.write(cv.png())
