"""The loss chart: plots/train_loss.svg, drawn from the training history by hand (no plotting library).

The same bytes for the same history on every machine (it is a train-stage output hashed into dvc.lock): fixed
size, fixed number formats, no fonts or timestamps embedded. `dvc plots show` shows it as an image plot (no
JavaScript, so it works offline) and the Prefect flow embeds it in its loss-curve artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 72, 28, 40  # margins: loss axis left, lr axis right
LOSS_COLOUR, LR_COLOUR = "#1f77b4", "#ff7f0e"


def fmt_loss(value: float) -> str:
    """A loss to 4 significant digits (0.6931, 12.35)."""
    return f"{value:.4g}"


def fmt_lr(value: float) -> str:
    """A learning rate in scientific notation with 3 significant digits (1.00e-04)."""
    return f"{value:.2e}"


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo] if hi == lo else [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def loss_svg(history: Sequence[dict]) -> str:
    """An SVG line chart of ``history`` rows (step, loss, lr): loss on the left axis, lr dashed on the right."""
    steps = [int(h["step"]) for h in history]
    losses = [float(h["loss"]) for h in history]
    lrs = [float(h["lr"]) for h in history]
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    x = _scale(min(steps, default=0), max(steps, default=1), x0, x1)
    y_loss = _scale(min(losses, default=0.0), max(losses, default=1.0), y0, y1)
    y_lr = _scale(0.0, max(lrs, default=0.0), y0, y1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<path d="M{x0},{y1}V{y0}H{x1}V{y1}" fill="none" stroke="#888"/>',
    ]
    title = "training loss" + (f": {fmt_loss(losses[-1])} at step {steps[-1]}" if history else " (no steps)")
    out.append(f'<text x="{x0}" y="{TOP - 10}" font-size="13">{escape(title)}</text>')
    for v in _ticks(min(losses, default=0.0), max(losses, default=1.0)):
        out.append(
            f'<text x="{x0 - 6}" y="{y_loss(v) + 4:.1f}" text-anchor="end" fill="{LOSS_COLOUR}">{fmt_loss(v)}</text>'
        )
    for v in _ticks(0.0, max(lrs, default=0.0), 3):
        out.append(f'<text x="{x1 + 6}" y="{y_lr(v) + 4:.1f}" fill="{LR_COLOUR}">{fmt_lr(v)}</text>')
    for s in sorted({steps[0], steps[len(steps) // 2], steps[-1]} if steps else set()):
        out.append(f'<text x="{x(s):.1f}" y="{y0 + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">step</text>')
    for values, y, colour, dash in (
        (lrs, y_lr, LR_COLOUR, ' stroke-dasharray="4 3"'),
        (losses, y_loss, LOSS_COLOUR, ""),
    ):
        points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values, strict=True))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
    if len(steps) <= 60:  # one step (or a few) still shows as points
        out += [
            f'<circle cx="{x(s):.1f}" cy="{y_loss(v):.1f}" r="3" fill="{LOSS_COLOUR}"/>'
            for s, v in zip(steps, losses, strict=True)
        ]
    out.append(
        f'<text x="{x1}" y="{TOP - 10}" text-anchor="end"><tspan fill="{LOSS_COLOUR}">— loss</tspan> '
        f'<tspan fill="{LR_COLOUR}">- - lr</tspan></text>'
    )
    return "\n".join(out) + "\n</svg>\n"
