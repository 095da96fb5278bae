"""Figures for trigger latents (plotly), written as standalone HTML that works offline.

Each function returns a plotly Figure (or an HTML string for token highlights); `write_figure`
saves one with plotly.js embedded, so the file opens without a network. The report embeds
plotly.js once for all its figures instead.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from diffkit.files import write_text
from analyses.stats import split_masks
from diffkit.specs import TriggerSpec

def split_table(scores: torch.Tensor, sequences: pd.DataFrame, spec: TriggerSpec, latents: list[int],
                stat: str = "fire_rate") -> pd.DataFrame:
    """[latents × splits]: the fraction of each split's prompts where the latent fires ('fire_rate')
    or its mean prompt score ('mean')."""
    sub = scores[:, latents].float()
    columns = {}
    for name, mask in split_masks(sequences, spec).items():
        rows = sub[torch.from_numpy(mask)]
        columns[name] = ((rows > 0).float().mean(0) if stat == "fire_rate" else rows.mean(0)).numpy()
    return pd.DataFrame(columns, index=pd.Index(latents, name="latent"))


def latent_split_heatmap(table: pd.DataFrame, title: str = "", stat: str = "fire rate") -> go.Figure:
    """Heatmap of a split_table: one row per latent, one column per split."""
    fig = go.Figure(go.Heatmap(
        z=table.to_numpy(), x=list(table.columns), y=[f"latent {j}" for j in table.index],
        colorscale="Viridis", colorbar=dict(title=stat),
        hovertemplate="%{y}<br>%{x}<br>" + stat + " %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, yaxis=dict(autorange="reversed"), height=180 + 22 * len(table),
                      margin=dict(l=90, r=20, t=50, b=120))
    return fig


def selective_ablation_figure(results: dict, spec: TriggerSpec, layer: int) -> go.Figure:
    """Rows: whose pair-selective set is ablated; columns: every pair's ASR after it. A selective set
    empties its own cell on the diagonal and leaves its row's other cells at the unablated ASR."""
    names = {p.id: p.name for p in spec.pairs}
    rows = [p.id for p in spec.pairs]
    z = [[results[r]["asr_after"].get(c) if results[r].get("latents") else None for c in rows] for r in rows]
    text = [[("" if v is None else f"{v:.2f}") for v in row] for row in z]
    labels = [f"{names[r]} {results[r].get('latents', [])}" for r in rows]
    fig = go.Figure(go.Heatmap(z=z, x=[names[c] for c in rows], y=labels, text=text, texttemplate="%{text}",
                               zmin=0, zmax=1, colorscale="RdBu", colorbar=dict(title="ASR after"),
                               hovertemplate="ablating %{y}<br>%{x}: ASR %{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"layer {layer}: ASR of each pair (columns) after ablating one pair's selective latents (rows)",
                      xaxis_title="pair whose attacks are measured", yaxis=dict(autorange="reversed"),
                      height=200 + 45 * len(rows), margin=dict(l=260, r=20, t=60, b=80))
    return fig


def activation_histograms(scores: torch.Tensor, sequences: pd.DataFrame, spec: TriggerSpec, latent: int,
                          title: str = "") -> go.Figure:
    """Overlaid histograms of one latent's prompt scores, one trace per split (silent prompts included)."""
    fig = go.Figure()
    for name, mask in split_masks(sequences, spec).items():
        values = scores[torch.from_numpy(mask), latent].numpy()
        fig.add_trace(go.Histogram(x=values, name=name, opacity=0.6, histnorm="probability", nbinsx=30))
    fig.update_layout(barmode="overlay", title=title or f"latent {latent}: max activation per prompt",
                      xaxis_title="max activation over the prompt", yaxis_title="share of the split's prompts", height=380)
    return fig


def top_examples_html(activations, latent: int, n: int = 8, title: str = "") -> str:
    """The `n` sequences where `latent` fires hardest, each token shaded by the latent's activation.

    Trigger tokens are underlined and the decision token boxed, so one can see whether the latent
    reads the words themselves or the place where the model decides.
    """
    scores = activations.prompt_scores()[:, latent]
    order = torch.argsort(scores, descending=True)[:n]
    column = activations.dense([latent])[:, 0]
    tokens, seqs = activations.tokens, activations.sequences
    peak = max(float(column.max()), 1e-8)
    lines = []
    for r in order.tolist():
        if scores[r] <= 0:
            break
        rows = np.flatnonzero(tokens["record"].to_numpy() == r)
        spans = []
        for i in rows:
            t = tokens.iloc[i]
            text = t["token"] if "token" in tokens.columns else f"[{t['token_id']}]"
            a = float(column[i])
            style = f"background: rgba(220, 60, 30, {a / peak:.3f});"
            if t["is_trigger_token"]:
                style += " text-decoration: underline;"
            if t["is_decision_token"]:
                style += " outline: 1px solid #333;"
            spans.append(f'<span class="tok" style="{style}" title="{a:.3f}">{html.escape(str(text))}</span>')
        seq = seqs.iloc[r]
        label = f"{seq['condition']}" + (f" pair {seq['pair_id']}" if seq["pair_id"] >= 0 else "")
        lines.append(f'<div class="example"><span class="meta">{html.escape(label)} · max {float(scores[r]):.2f}</span> '
                     f'{"".join(spans)}</div>')
    if not lines:
        lines.append('<div class="example">this latent never fires on the analysed prompts</div>')
    heading = html.escape(title or f"latent {activations.layer}/{latent}: top-activating prompts")
    return f'<div class="examples"><h4>{heading}</h4>{"".join(lines)}</div>'


EXAMPLE_CSS = """
.examples .example { font-family: monospace; white-space: pre-wrap; margin: 4px 0; line-height: 1.7; }
.examples .meta { color: #666; font-size: 0.85em; margin-right: 6px; }
.examples .tok { border-radius: 2px; }
"""


def grid_figure(summary: pd.DataFrame, overlap: pd.DataFrame) -> go.Figure:
    """The relatedness × charged-ness comparison of one layer's pairs.

    Left: the 2×2 grid, each cell's pairs with the number of latents they need and their best
    latent's AUROC and specificity (colour). Middle: where the pair's top latents fire (trigger tokens,
    decision token, elsewhere) as a share of their activation mass. Right: shared top latents.
    """
    fig = make_subplots(rows=1, cols=3, column_widths=[0.36, 0.34, 0.30], horizontal_spacing=0.1,
                        subplot_titles=("best specificity (colour), latents needed", "where the top latents fire",
                                        "shared top latents"))
    cells = {(r, c): [] for r in (True, False) for c in (False, True)}
    for _, row in summary.iterrows():
        cells[(bool(row["related"]), bool(row["charged"]))].append(row)
    z, text = [], []
    for related in (True, False):
        z_row, t_row = [], []
        for charged in (False, True):
            rows = cells[(related, charged)]
            z_row.append(float(np.mean([r["top_specificity"] for r in rows])) if rows else 0.0)
            t_row.append("<br><br>".join(f"<b>{r['pair']}</b><br>{_needed(r)}<br>AUROC {r['top_auroc']:.2f} · "
                                         f"spec {r['top_specificity']:.2f}" for r in rows) or "no pair")
        z.append(z_row)
        text.append(t_row)
    fig.add_trace(go.Heatmap(z=z, x=["neutral", "charged"], y=["related", "unrelated"], text=text,
                             texttemplate="%{text}", textfont=dict(size=12), colorscale="Blues", showscale=False,
                             zmin=0.5, zmax=1.2,
                             hovertemplate="%{y}, %{x}<br>%{text}<extra></extra>"), row=1, col=1)
    for name, color in (("trigger_mass", "#d62728"), ("decision_mass", "#1f77b4"), ("other_mass", "#aaaaaa")):
        fig.add_trace(go.Bar(x=summary["pair"], y=summary[name], name=name.replace("_mass", ""), marker_color=color),
                      row=1, col=2)
    fig.add_trace(go.Heatmap(z=overlap.to_numpy(), x=list(overlap.columns), y=list(overlap.index), colorscale="Greens",
                             text=overlap.to_numpy(), texttemplate="%{text}", showscale=False,
                             hovertemplate="%{y} ∩ %{x}: %{z} latents<extra></extra>"), row=1, col=3)
    fig.update_layout(barmode="stack", height=430, legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=3)
    return fig


def _needed(row) -> str:
    return f"{int(row['n_needed'])} latent(s)" if pd.notna(row["n_needed"]) else "not reached"


def layer_figure(summary: pd.DataFrame) -> go.Figure:
    """Best latent's AUROC (solid) and specificity (dashed) per pair across layers."""
    fig = go.Figure()
    colors = plotly_colors()
    for i, (pair, rows) in enumerate(summary.groupby("pair", sort=False)):
        color = colors[i % len(colors)]
        fig.add_trace(go.Scatter(x=rows["layer"], y=rows["top_auroc"], mode="lines+markers", name=f"{pair} AUROC",
                                 line=dict(color=color)))
        fig.add_trace(go.Scatter(x=rows["layer"], y=rows["top_specificity"], mode="lines+markers",
                                 name=f"{pair} specificity", line=dict(color=color, dash="dash")))
    fig.update_layout(title="best latent by layer", xaxis=dict(title="layer", type="category"),
                      yaxis_title="AUROC / specificity",
                      yaxis=dict(range=[0, 1.02]), height=360)
    return fig


def plotly_colors() -> list[str]:
    import plotly.express as px

    return px.colors.qualitative.Plotly


def table_figure(frame: pd.DataFrame, title: str = "") -> go.Figure:
    """A pandas frame as a plotly table (floats to 3 decimals)."""
    shown = frame.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    fig = go.Figure(go.Table(header=dict(values=list(shown.columns), fill_color="#e8e8e8", align="left"),
                             cells=dict(values=[shown[c].astype(str).tolist() for c in shown.columns], align="left")))
    fig.update_layout(title=title, height=120 + 28 * min(len(shown), 25), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def write_figure(fig: go.Figure, path: str | Path) -> Path:
    """Standalone HTML with plotly.js embedded (no CDN: it must open offline), written atomically."""
    return write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))


def write_html_fragment(body: str, path: str | Path, title: str = "diffkit") -> Path:
    """A standalone page around an HTML fragment (e.g. top_examples_html)."""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{EXAMPLE_CSS}</style></head><body>{body}</body></html>")
    return write_text(path, page)


HISTORY_PANELS = (("loss", "loss (mse + aux-k)", "log"), ("fve", "FVE (training batch)", "linear"),
                  ("l0", "L0", "linear"), ("dead", "dead fraction", "linear"), ("auxk", "aux-k loss", "log"),
                  ("threshold", "inference threshold", "linear"), ("lr", "learning rate", "linear"),
                  ("tokens_per_second", "tokens / s", "linear"))


def history_figure(history: pd.DataFrame) -> go.Figure:
    """The training history (history.jsonl) against tokens seen, one line per SAE in every panel."""
    fig = make_subplots(rows=2, cols=4, subplot_titles=[title for _, title, _ in HISTORY_PANELS],
                        horizontal_spacing=0.06, vertical_spacing=0.16)
    colors = plotly_colors()
    for i, (sae, rows) in enumerate(history.groupby("sae", sort=False)):
        for p, (column, _, scale) in enumerate(HISTORY_PANELS):
            fig.add_trace(go.Scatter(x=rows["tokens"], y=rows[column], mode="lines", name=sae, legendgroup=sae,
                                     showlegend=p == 0, line=dict(color=colors[i % len(colors)])),
                          row=p // 4 + 1, col=p % 4 + 1)
            fig.update_yaxes(type=scale, row=p // 4 + 1, col=p % 4 + 1)
    fig.update_xaxes(title_text="tokens", row=2)
    fig.update_layout(height=560, title="training history (history.jsonl)", margin=dict(t=80))
    return fig


def fidelity_figure(metrics: dict[str, dict]) -> go.Figure:
    """Spliced-in fidelity per SAE: left, the fraction of KL(ft ‖ base) recovered on each kind of text,
    with the SAE's reconstruction spliced in (solid) and with the difference zeroed (hatched); right,
    each pair's attack success rate for the fine-tune, the splice and the zeroed difference."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KL(ft ‖ base) recovered", "attack success rate per pair"),
                        horizontal_spacing=0.1)
    colors = plotly_colors()
    for i, (name, spliced) in enumerate(metrics.items()):
        color = colors[i % len(colors)]
        groups = list(spliced["kl_recovered"])
        fig.add_trace(go.Bar(x=groups, y=[spliced["kl_recovered"][g] for g in groups], name=f"{name} spliced",
                             marker_color=color), row=1, col=1)
        fig.add_trace(go.Bar(x=groups, y=[spliced["kl_recovered_zeroed"][g] for g in groups], name=f"{name} zeroed",
                             marker=dict(color=color, pattern_shape="/", opacity=0.5)), row=1, col=1)
        for variant, shape in (("spliced", ""), ("zeroed", "/")):
            rates = spliced["asr"][variant]
            fig.add_trace(go.Bar(x=list(rates), y=list(rates.values()), name=f"{name} ASR {variant}", showlegend=False,
                                 marker=dict(color=color, pattern_shape=shape, opacity=1 if not shape else 0.5)), row=1, col=2)
    first = next(iter(metrics.values()))
    fig.add_trace(go.Scatter(x=list(first["asr"]["finetuned"]), y=list(first["asr"]["finetuned"].values()), mode="markers",
                             name="fine-tune ASR", marker=dict(symbol="line-ew-open", size=30, color="black")), row=1, col=2)
    fig.update_yaxes(range=[min(0, *(v for m in metrics.values() for v in m["kl_recovered_zeroed"].values() if v is not None)), 1.05],
                     row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    fig.update_layout(barmode="group", height=420, legend=dict(orientation="h", y=-0.2))
    return fig
