"""Tiny server-rendered SVG bar charts: readable with JavaScript off."""

from __future__ import annotations

from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 360, 140, 18


def bar_chart(values: list[float], labels: list[str], unit: str = "") -> Markup:
    """A bar chart as inline SVG; every bar carries a <title> with its exact value."""
    if not values:
        return Markup('<p class="empty">No data yet.</p>')
    top = max(values) or 1.0
    slot = (WIDTH - 2 * PAD) / len(values)
    bars = []
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        height = (HEIGHT - 2 * PAD) * value / top
        x = PAD + i * slot
        y = HEIGHT - PAD - height
        bars.append(
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" height="{height:.1f}">'
            f"<title>{escape(label)}: {value:g}{escape(unit)}</title></rect>"
        )
    axis = (
        f'<text x="{PAD}" y="{PAD - 6}">max {top:g}{escape(unit)}</text>'
        f'<text x="{PAD}" y="{HEIGHT - 4}">{escape(labels[0])}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 4}" text-anchor="end">{escape(labels[-1])}</text>'
    )
    return Markup(
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg">'
        f'{axis}{"".join(bars)}</svg>'
    )
