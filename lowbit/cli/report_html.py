"""The ``debug compare`` HTML report: one self-contained file, inline SVG, no JavaScript, no network.

A person opens it in a browser offline (or attaches it to an issue): a table of per-pass numbers, a line
chart of per-layer SQNR across depth for each pass, and a heat map of layers × passes.
"""

from __future__ import annotations

import html
import math
from typing import Any

from lowbit.cli.common import worst_layer
from lowbit.cli.probes import fmt_metric
from lowbit.ir.graph import BLOCK_NAMES

CLIP_DB = 80.0
"""The line chart's top: above this an output is float-exact for practical purposes."""
HEAT_TOP_DB = 60.0
"""Heat-map colours saturate at this SQNR, so the differences between lossy passes stay visible."""
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "∞"
    if isinstance(x, float) and math.isnan(x):  # a NaN output: it printed as -∞
        return "NaN"
    if isinstance(x, float) and not math.isfinite(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _metric(metric: str, value: Any) -> str:
    """The end metric as the terminal table writes it (``fmt_metric``): 4 decimals showed a cosine distance of
    0.00003 as 0.0000 (exact) and the float model's -4e-16 as -0.0000; NaN/inf (null in the JSON) as ``_num``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _num(value)
    return fmt_metric(metric, float(value))


def _sqnr(stage: dict[str, Any], layer: str) -> float | None:
    """A layer's SQNR: None where it is identical to float (inf, or null in the JSON form); NaN stays NaN."""
    v = stage["layers"].get(layer, {}).get("sqnr_db")
    return None if v is None or v == math.inf else float(v)


def _is_nan(v: float | None) -> bool:
    return v is not None and math.isnan(v)


def _off_axis(v: float | None) -> bool:
    """NaN or -inf dB: no place on a dB axis or colour scale (an infinite error is shown as a value, '-∞')."""
    return v is not None and not math.isfinite(v)


def _cell(stage: dict[str, Any], layer: str, key: str, digits: int) -> str:
    """A layer's number, or n/a where the stage has no comparable output for it (a removed or resized block)."""
    return "n/a" if layer not in stage["layers"] else _num(stage["layers"][layer].get(key), digits)


def line_chart(stages: list[dict[str, Any]], layers: list[str], width: int = 960, height: int = 360) -> str:
    """Per-layer SQNR (dB) across depth, one line per pass that has finite values."""
    ml, mr, mt, mb = 60, 300, 20, 60
    pw, ph = width - ml - mr, height - mt - mb
    series = []
    # NaN, and -inf (an output that overflowed to inf): not on the axis (-inf made the axis' floor an OverflowError)
    nan = [s for s in stages if any(_off_axis(_sqnr(s, layer)) for layer in layers)]
    for s in stages:
        vals = [None if _off_axis(v) else v for v in (_sqnr(s, layer) for layer in layers)]
        if any(v is not None for v in vals):
            series.append((s, vals))
    finite = [v for _, vals in series for v in vals if v is not None]
    if not layers:
        return f"<p>The graph has no repeated blocks ({BLOCK_NAMES}) to compare layer by layer.</p>"
    nan_note = ("<p><b>NaN</b> or <b>-∞ dB</b> block outputs after "
                + ", ".join(f"#{s['index']} <code>{_esc(s['spec'])}</code>" for s in nan)
                + " (not drawn).</p>") if nan else ""
    if not finite:
        return nan_note or "<p>No pass changed any layer output (every SQNR is infinite).</p>"
    # exact passes sit at 120+ dB (float rounding); clipping there keeps quantization's 10-40 dB readable
    series = [(s, [None if v is None else min(v, CLIP_DB) for v in vals]) for s, vals in series]
    finite = [min(v, CLIP_DB) for v in finite]
    lo, hi = min(finite), max(finite)
    lo, hi = math.floor(lo / 10) * 10, math.ceil(hi / 10) * 10
    if hi == lo:
        hi = lo + 10
    n = len(layers)

    def x(i: int) -> float:
        return ml + (pw * i / (n - 1) if n > 1 else pw / 2)

    def y(v: float) -> float:
        return mt + ph * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="per-layer SQNR across depth">',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    step = 10 if hi - lo <= 80 else 20
    for t in range(int(lo), int(hi) + 1, step):
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{ml - 6}" y="{y(t) + 4:.1f}" font-size="11" text-anchor="end">{t}</text>')
    label_every = max(1, n // 16)
    for i, layer in enumerate(layers):
        if i % label_every == 0 or i == n - 1:
            out.append(f'<text x="{x(i):.1f}" y="{mt + ph + 16}" font-size="11" text-anchor="middle">'
                       f'{_esc(layer.rsplit(".", 1)[-1])}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 12}" font-size="12" text-anchor="middle">layer (block '
               'index)</text>')
    out.append(f'<text x="14" y="{mt + ph / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {mt + ph / 2})">SQNR of block output (dB)</text>')
    for k, (s, vals) in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(x(i), y(v)) for i, v in enumerate(vals) if v is not None]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for a, b in pts:
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>')
        ly = mt + 14 + 18 * k
        out.append(f'<rect x="{ml + pw + 12}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{ml + pw + 30}" y="{ly + 1}" font-size="12">{_spec_label(s, 38)}</text>')
    out.append("</svg>")
    return nan_note + "\n".join(out)


def _spec_label(stage: dict[str, Any], room: int) -> str:
    """``#i spec`` for an SVG label with ``room`` characters for the spec: a longer one is cut with an ellipsis and
    the whole spec is its tooltip (it was cut silently, and two passes sharing their first 30 characters, such as a
    recipe's two quantize passes, read the same)."""
    spec = stage["spec"]
    shown = spec if len(spec) <= room else spec[:room - 1] + "…"
    tip = "" if shown == spec else f"<title>{_esc(spec)}</title>"
    return f'{tip}#{stage["index"]} {_esc(shown)}'


def _heat_colour(v: float | None, lo: float, hi: float) -> str:
    """Low SQNR (bad) red, high (good) green, identical (∞) light grey, NaN black."""
    if v is None:
        return "#eeeeee"
    if math.isnan(v):
        return "#000000"
    t = 0.0 if hi == lo else max(0.0, min(1.0, (v - lo) / (hi - lo)))
    r, g = int(215 - 150 * t), int(48 + 150 * t)
    return f"rgb({r},{g},80)"


def heat_map(stages: list[dict[str, Any]], layers: list[str]) -> str:
    """Layers (columns) × passes (rows), coloured by SQNR, value written in each cell."""
    cw, chh, left, top = max(20, min(70, 900 // max(1, len(layers)))), 26, 240, 30
    width, height = left + cw * len(layers) + 10, top + chh * len(stages) + 40
    # -inf set the scale's floor: every finite cell then coloured (v - lo) / (hi - lo) = NaN, i.e. full green
    finite = [v for s in stages for layer in layers if (v := _sqnr(s, layer)) is not None and not _off_axis(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    hi = min(hi, HEAT_TOP_DB)  # above this everything is "fine"; the colours resolve the lossy range
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           'aria-label="heat map of SQNR, layers by passes">']
    for j, layer in enumerate(layers):
        out.append(f'<text x="{left + cw * j + cw / 2}" y="{top - 10}" font-size="11" text-anchor="middle">'
                   f'{_esc(layer.rsplit(".", 1)[-1])}</text>')
    for i, s in enumerate(stages):
        yy = top + chh * i
        out.append(f'<text x="{left - 8}" y="{yy + chh / 2 + 4}" font-size="12" text-anchor="end">'
                   f'{_spec_label(s, 30)}</text>')
        for j, layer in enumerate(layers):
            v = _sqnr(s, layer)
            missing = layer not in s["layers"]  # removed or resized block: not comparable (it drew as ∞, identical)
            label = "n/a" if missing else _num(v, 0)
            ink = ' fill="#ffffff"' if _is_nan(v) else ""  # readable on the black cell
            out.append(f'<rect x="{left + cw * j}" y="{yy}" width="{cw - 1}" height="{chh - 1}" '
                       f'fill="{"#ffffff" if missing else _heat_colour(v, lo, hi)}"><title>{_esc(layer)} after '
                       f'{_esc(s["spec"])}: {"n/a" if missing else _num(v, 1)} dB</title></rect>')
            if cw >= 28:
                out.append(f'<text x="{left + cw * j + cw / 2}" y="{yy + chh / 2 + 4}" font-size="10" '
                           f'text-anchor="middle"{ink}>'
                           f'{label}</text>')
    out.append(f'<text x="{left}" y="{height - 12}" font-size="11">SQNR dB: red = low (more error), green = '
               f'high (≥ {HEAT_TOP_DB:.0f} dB full green); grey = identical to float; black = NaN; white = n/a '
               '(block removed or resized, or a residual rotation this run does not know).</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_report(data: dict[str, Any]) -> str:
    """The whole report as one HTML string (``data`` is ``CompareResult.to_dict()``)."""
    stages = data["stages"]
    layers = list(stages[0]["layers"]) if stages else []
    passes = [s for s in stages if s["index"] >= 0]
    metric = {"ppl": "perplexity", "kl": "KL from float"}.get(data["metric"], "1 − embedding cosine")
    rows = []
    for s in stages:
        found = worst_layer(s["layers"])
        worst = (found[0], found[1]["sqnr_db"]) if found else ("-", None)
        rows.append(
            f"<tr><td>{'' if s['index'] < 0 else s['index']}</td><td><code>{_esc(s['spec'])}</code></td>"
            f"<td>{'yes' if s['changed'] else ('—' if s['index'] < 0 else 'no')}</td>"
            f"<td>{_metric(data['metric'], s['metric'])}</td><td>{_num(s['output']['sqnr_db'], 1)}</td>"
            f"<td>{_num(s['output']['cosine'], 6)}</td><td>{_num(s['output']['max_abs'], 4)}</td>"
            f"<td>{_esc(worst[0])}</td><td>{_num(worst[1], 1)}</td><td>{s['seconds'] * 1000:.0f}</td></tr>")
    layer_rows = []
    for layer in layers:
        cells = "".join(
            f"<td>{_cell(s, layer, 'sqnr_db', 1)} / {_cell(s, layer, 'cosine', 5)}</td>" for s in passes)
        layer_rows.append(f"<tr><td>{_esc(layer)}</td>{cells}</tr>")
    head = "".join(f"<th>#{s['index']} <code>{_esc(s['spec'])}</code></th>" for s in passes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lowbit debug compare: {_esc(data['model'])}</title>
<style>
body {{ font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:nth-child(2), td:first-child {{ text-align: left; }}
code {{ font-size: 12px; }} h2 {{ margin-top: 28px; }} .meta {{ color: #555; }}
</style></head><body>
<h1>lowbit debug compare</h1>
<p class="meta">model <b>{_esc(data['model'])}</b> · pipeline <code>{_esc(data['pipeline'])}</code><br>
inputs: {_esc(data['inputs'])} · end metric: {metric} · took {data['seconds']:.1f} s</p>
<h2>Per pass</h2>
<table><tr><th>#</th><th>pass</th><th>changed</th><th>{metric}</th><th>output SQNR dB</th><th>output cosine</th>
<th>output max |err|</th><th>lowest-SQNR layer</th><th>its SQNR dB</th><th>pass ms</th></tr>
{''.join(rows)}</table>
<h2>Per-layer error across depth</h2>
<p>SQNR (dB) of each block's output (the residual stream leaving the block) against the float model, after each
pass. Lower is worse; a pass that does not change the numerics has no line (infinite SQNR); values above
{CLIP_DB:.0f} dB (float rounding only) are drawn at {CLIP_DB:.0f} dB.</p>
{line_chart(passes, layers)}
<h2>Heat map: layers × passes</h2>
{heat_map(passes, layers)}
<h2>Per-layer numbers (SQNR dB / cosine)</h2>
<table><tr><th>layer</th>{head}</tr>{''.join(layer_rows)}</table>
</body></html>
"""
