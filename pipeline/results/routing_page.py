"""A picture of routing: held-out text, each character coloured by the expert the router chose
for it and shaded by how many bits the composition saved over the central model there.

One self-contained HTML file (inline CSS, no scripts, no fonts or images from elsewhere), so
the MLflow UI's artifact viewer shows it as it is. Hovering a stretch of text names its expert
and the bits saved per byte.
"""
from __future__ import annotations

import colorsys
import html

import numpy as np

HUES = (210, 30, 120, 0, 275, 175, 320, 55, 95, 245)  # well-separated first; then the golden angle
FULL_SHADE_BITS = 3.0  # saved bits per byte at which a colour is at its strongest
STEP = 0.5  # bits: shades are drawn in steps of this


def expert_hue(e: int) -> float:
    return float(HUES[e] if e < len(HUES) else (HUES[-1] + 137.508 * (e - len(HUES) + 1)) % 360)


def shade(e: int, saved: float) -> str:
    """#rrggbb of expert e's hue, paler for fewer bits saved (no bits saved: palest)."""
    strength = min(max(saved, 0.0), FULL_SHADE_BITS) / FULL_SHADE_BITS
    lightness = 0.93 - 0.43 * strength
    r, g, b = colorsys.hls_to_rgb(expert_hue(e) / 360, lightness, 0.75)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def characters(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each UTF-8 character (a stray byte is a character of its own)."""
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        n = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 1
        n = n if i + n <= len(data) and all(0x80 <= b < 0xC0 for b in data[i + 1:i + n]) else 1
        out.append((i, i + n))
        i += n
    return out


def spans(data: bytes, choices: np.ndarray, saved: np.ndarray) -> list[tuple[str, int, float]]:
    """(text, expert or -1, saved bits per byte) runs of characters with the same expert and shade
    step; a character takes the expert of its first byte and the mean bits saved over its bytes."""
    out: list[tuple[str, int, float]] = []
    key = None
    for start, end in characters(data):
        expert, bits = int(choices[start]), float(np.mean(saved[start:end]))
        step = round(bits / STEP)
        text = data[start:end].decode("utf-8", errors="replace")
        if (expert, step) == key:
            prev_text, _, prev_bits = out[-1]
            n_prev = len(prev_text.encode("utf-8", errors="replace"))
            out[-1] = (prev_text + text, expert, (prev_bits * n_prev + bits * (end - start)) / (n_prev + end - start))
        else:
            out.append((text, expert, bits))
            key = (expert, step)
    return out


def render(documents: list[dict], experts: list[dict], title: str) -> str:
    """The page. documents: {"label", "bytes", "choices" (n,), "saved_bits" (n,)}; experts, in the
    composition's order: {"name", "cluster", "domain", "purity", "uri"}."""
    legend = "".join(
        f'<li><span class="swatch" style="background:{shade(e, FULL_SHADE_BITS)}"></span>'
        f'<b>{html.escape(x["name"])}</b> cluster {html.escape(str(x["cluster"]))}, '
        f'domain {html.escape(str(x["domain"]))}'
        + (f' ({100 * x["purity"]:.0f}% of its cluster)' if x.get("purity") is not None else "")
        + f' <span class="uri">{html.escape(x["uri"])}</span></li>' for e, x in enumerate(experts))
    scale = "".join(f'<span class="swatch" style="background:{shade(0, b)}"></span>{b:g}&nbsp;'
                    for b in np.arange(0, FULL_SHADE_BITS + STEP, 1.0))
    body = []
    for doc in documents:
        parts = []
        for text, expert, bits in spans(doc["bytes"], doc["choices"], doc["saved_bits"]):
            name = experts[expert]["name"] if expert >= 0 else "no expert"
            style = f"background:{shade(expert, bits)}" if expert >= 0 else ""
            worse = ' class="worse"' if bits < 0 else ""
            parts.append(f'<span{worse} style="{style}" title="{html.escape(name)}: {bits:+.2f} bits per byte '
                         f'saved">{html.escape(text)}</span>')
        body.append(f'<section><h2>{html.escape(doc["label"])}</h2><div class="text">{"".join(parts)}</div>'
                    "</section>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #111; background: #fff; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.6; border: 1px solid #ddd; padding: .6em; }}
.swatch {{ display: inline-block; width: 1.1em; height: 1.1em; vertical-align: middle; margin-right: .3em;
          border: 1px solid #999; }}
.legend li {{ list-style: none; margin: .2em 0; }}
.uri {{ color: #666; font-size: 85%; }}
.worse {{ text-decoration: underline dotted #c00; }}
h2 {{ font-size: 100%; margin: 1.2em 0 .3em; }}
</style></head><body>
<h1 style="font-size:120%">{html.escape(title)}</h1>
<div class="legend"><p>Each character is coloured by the expert the router weighted most for it, stronger where the
composition saved more bits per byte over the central model (scale: {scale} bits); white: routed to no expert;
dotted red underline: the composition did worse than the central model. Hover for figures.</p>
<ul>{legend}</ul></div>
{"".join(body)}
</body></html>
"""
