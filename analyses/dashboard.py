"""`diffkit latent`: a dashboard for any latent of a run, in the manner of SAEDashboard / Neuronpedia.

For one latent of one SAE it gathers, from the held-out activations analyses/stats.py caches:
top-activating contexts from trigger prompts and from generic text (every token shaded by its
activation), examples drawn across the quantiles of its non-zero prompt scores, its activation
density (share of tokens firing, histogram of log10 of the non-zero values), its fire rate per
split and per control group of every pair; from the fine-tuned model, the logit effect of its
decoder direction through the final norm and the unembedding; and from every SAE of the run, its
nearest latents by decoder cosine. `latent_dashboard` returns all of it as a JSON-ready dict,
`add_dashboard` draws it into a page (analyses/page.py) and `show_dashboard` into a notebook.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale

from analyses.configs import LatentConfig
from analyses.page import Page, frame_html
from analyses.ranking import control_groups
from analyses.stats import Activations, Collection, load_activations, split_masks
from diffkit.devices import resolve_device
from diffkit.errors import DiffkitError
from diffkit.files import write_text
from diffkit.models import final_norm_of, load_model
from diffkit.run import RunInfo, load_run
from diffkit.sae_sources import resolve_options

COLORSCALE = "YlOrRd"
TRIGGER_CONDITIONS = ("poison", "single", "mismatch")


def anchor(layer: int, k: int, latent: int) -> str:
    """The id of a latent's section in a page set, for links from the report."""
    return f"latent-L{layer}-k{k}-{latent}"


# --- the numbers ---------------------------------------------------------------------------------


def latent_dashboard(run_dir, layer: int | None, latent: int, k: int | None = None, activations: Activations | None = None,
                     collection: Collection | None = None, finetuned=None, n_examples: int = 6) -> dict:
    """Everything on one latent's dashboard as a JSON-ready dict.

    `activations` (from load_activations) and `finetuned` (the fine-tuned model and its tokenizer, as
    diffkit.models.load_model returns them) may be passed in to share them across latents; otherwise
    they are loaded (activations from the cache when present).
    """
    run = run_dir if isinstance(run_dir, RunInfo) else load_run(run_dir)
    entry, sae = run.sae(layer, k)
    if not 0 <= latent < sae.dict_size:
        raise DiffkitError(f"latent {latent} is out of range: layer {entry.layer} k {entry.k} has latents 0..{sae.dict_size - 1}")
    if activations is None:
        activations = load_activations(run, [entry.layer], collection or Collection(k=k))[entry.layer]
    model, tokenizer = finetuned or load_model(run.finetuned)
    column = activations.dense([latent])[:, 0]
    scores = activations.prompt_scores()[:, latent]
    seqs = activations.sequences
    condition = seqs["condition"].to_numpy()
    return {
        "layer": entry.layer, "k": entry.k, "latent": latent, "anchor": anchor(entry.layer, entry.k, latent),
        "max_activation": float(column.max()),
        "density": density(column),
        "fire_rate_by_split": {name: float((scores[torch.from_numpy(m)] > 0).float().mean())
                               for name, m in split_masks(seqs, run.spec).items()},
        "fire_rate_by_group": {p.name: _group_rates(scores, seqs, p) for p in run.spec.pairs},
        "top_trigger": examples(activations, column, scores, np.isin(condition, TRIGGER_CONDITIONS), n_examples),
        "top_generic": examples(activations, column, scores, condition == "null", n_examples),
        "quantile_examples": quantile_examples(activations, column, scores),
        "logit_effect": logit_effect(model, tokenizer, sae.raw_direction(latent).detach()),
        "nearest": nearest_latents(run, entry, sae, latent),
    }


def density(column: torch.Tensor, bins: int = 30) -> dict:
    """Share of tokens where the latent fires and a histogram of log10 of its non-zero values."""
    active = column[column > 0]
    out = {"fraction_firing": float((column > 0).float().mean()), "n_tokens": int(column.numel()), "n_firing": int(active.numel())}
    if active.numel():
        counts, edges = np.histogram(np.log10(active.numpy()), bins=bins)
        out["log10_histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    return out


def _group_rates(scores: torch.Tensor, seqs, pair) -> dict:
    rates = {"matched_poison": float((scores[torch.from_numpy(_matched(seqs, pair))] > 0).float().mean())}
    for name, m in control_groups(seqs, pair).items():
        rates[name] = float((scores[torch.from_numpy(m)] > 0).float().mean())
    return rates


def _matched(seqs, pair) -> np.ndarray:
    return (seqs["condition"].to_numpy() == "poison") & (seqs["pair_id"].to_numpy() == pair.id)


def example(activations: Activations, column: torch.Tensor, record: int, score: float) -> dict:
    """One sequence with every token's activation and its trigger / decision flags."""
    tokens, seq = activations.tokens, activations.sequences.iloc[record]
    rows = np.flatnonzero(tokens["record"].to_numpy() == record)
    part = tokens.iloc[rows]
    return {
        "record": int(record), "condition": str(seq["condition"]), "pair_id": int(seq["pair_id"]), "max": float(score),
        "tokens": [{"text": str(t), "activation": float(column[i]), "trigger": bool(trig), "decision": bool(dec)}
                   for i, t, trig, dec in zip(rows, part["token"], part["is_trigger_token"], part["is_decision_token"])],
    }


def examples(activations, column, scores, mask: np.ndarray, n: int) -> list[dict]:
    """The `n` sequences within `mask` where the latent fires hardest (silent ones left out)."""
    masked = torch.where(torch.from_numpy(mask), scores, torch.full_like(scores, -1.0))
    order = torch.argsort(masked, descending=True)[:n]
    return [example(activations, column, int(r), float(scores[r])) for r in order if masked[r] > 0]


def quantile_examples(activations, column, scores, n_bins: int = 4, per_bin: int = 2, seed: int = 0) -> list[dict]:
    """Examples drawn at random from each quantile bin of the non-zero prompt scores, weakest bin first:
    what the latent does at a typical activation, not only at its peak."""
    firing = torch.nonzero(scores > 0).flatten()
    if not len(firing):
        return []
    values = scores[firing].numpy()
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1))
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_bins):
        inside = firing.numpy()[(values >= edges[b]) & ((values < edges[b + 1]) if b < n_bins - 1 else (values <= edges[b + 1]))]
        for r in rng.choice(inside, size=min(per_bin, len(inside)), replace=False) if len(inside) else []:
            out.append({**example(activations, column, int(r), float(scores[r])), "quantile_bin": f"{100 * b // n_bins}-{100 * (b + 1) // n_bins}%"})
    return out


@torch.no_grad()
def logit_effect(model, tokenizer, direction: torch.Tensor, n: int = 10) -> dict:
    """Tokens the direction promotes and suppresses: unembed(final_norm(d)), centred over the vocabulary.

    The norm is applied to the direction alone (in the residual it scales with the whole vector),
    so the values rank tokens; their size is not a logit change."""
    head = model.get_output_embeddings()
    d = direction.to(device=head.weight.device, dtype=head.weight.dtype)[None, None]
    logits = head(final_norm_of(model)(d))[0, 0].float()
    logits -= logits.mean()
    top, bottom = logits.topk(n), logits.topk(n, largest=False)
    as_list = lambda v: [{"token": tokenizer.decode([int(i)]), "token_id": int(i), "logit": float(x)} for x, i in zip(v.values, v.indices)]
    return {"promoted": as_list(top), "suppressed": as_list(bottom)}


def nearest_latents(run, entry, sae, latent: int, n: int = 8) -> list[dict]:
    """The run's latents (every layer and k) whose decoder directions are closest in cosine to this one's."""
    from diffkit.sae import load_sae

    d = torch.nn.functional.normalize(sae.decoder.weight[:, latent].detach().float(), dim=0)
    found = []
    for other in run.saes:
        W = sae.decoder.weight if other == entry else load_sae(other.path).decoder.weight
        cos = d @ torch.nn.functional.normalize(W.detach().float(), dim=0)
        if other == entry:
            cos[latent] = -2
        top = cos.topk(min(n, len(cos)))
        found += [{"layer": other.layer, "k": other.k, "latent": int(j), "cosine": float(c)} for c, j in zip(top.values, top.indices)]
    return sorted(found, key=lambda r: -r["cosine"])[:n]


# --- drawing -------------------------------------------------------------------------------------


DASHBOARD_CSS = """
.dashboard { border-top: 3px solid #444; margin-top: 2em; }
.dashboard .cols { display: flex; flex-wrap: wrap; gap: 24px; }
.tokens .tok { border-right: 1px solid #bbb; padding: 0 1px; }
.tokens .trig { text-decoration: underline 2px #06c; font-weight: bold; }
.tokens .dec { outline: 2px solid #06c; }
.scale { display: inline-block; width: 200px; height: 12px; vertical-align: middle; border: 1px solid #999; }
"""


def token_color(value: float, peak: float) -> str:
    return "transparent" if value <= 0 else sample_colorscale(COLORSCALE, [min(value / peak, 1.0)])[0]


def tokens_html(ex: dict, peak: float) -> str:
    """One example: each token a box shaded by its activation (hover shows the value)."""
    spans = []
    for t in ex["tokens"]:
        cls = "tok" + (" trig" if t["trigger"] else "") + (" dec" if t["decision"] else "")
        text = html.escape(t["text"].replace("\n", "↵"))
        spans.append(f'<span class="{cls}" style="background: {token_color(t["activation"], peak)}" '
                     f'title="{t["activation"]:.3f}">{text}</span>')
    label = ex["condition"] + (f" pair {ex['pair_id']}" if ex["pair_id"] >= 0 else "")
    if "quantile_bin" in ex:
        label += f" · bin {ex['quantile_bin']}"
    return (f'<div class="example tokens"><span class="meta">{html.escape(label)} · max {ex["max"]:.2f}</span> '
            f'{"".join(spans)}</div>')


def examples_html(title: str, rows: list[dict], peak: float) -> str:
    body = "".join(tokens_html(ex, peak) for ex in rows) or '<div class="example">never fires here</div>'
    return f'<div class="examples"><h4>{html.escape(title)}</h4>{body}</div>'


def legend_html(peak: float) -> str:
    stops = ", ".join(sample_colorscale(COLORSCALE, list(np.linspace(0, 1, 6))))
    return (f"<p>activation 0 <span class='scale' style='background: linear-gradient(to right, {stops})'></span> "
            f"{peak:.2f} · <span class='tokens'><span class='tok trig'>trigger word</span> "
            f"<span class='tok dec'>decision token</span></span> · hover a token for its value</p>")


def density_figure(d: dict) -> go.Figure:
    dens = d["density"]
    fig = go.Figure()
    if "log10_histogram" in dens:
        h = dens["log10_histogram"]
        edges = np.array(h["edges"])
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=h["counts"], width=np.diff(edges), marker_color="#d95f02",
                             hovertemplate="log10 activation %{x:.2f}<br>%{y} tokens<extra></extra>"))
    fig.update_layout(title=f"activation density: fires on {100 * dens['fraction_firing']:.2f}% of {dens['n_tokens']:,} tokens",
                      xaxis_title="log10 activation (non-zero values)",
                      yaxis=dict(title="tokens (log scale)", type="log", range=[-0.3, np.log10(max(dens["n_firing"], 1)) + 0.2]),
                      height=300, width=520, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def fire_rate_figure(d: dict) -> go.Figure:
    """Left: share of each split's prompts where the latent fires. Right: per pair, its matched poison
    prompts and each control group."""
    from plotly.subplots import make_subplots

    split = d["fire_rate_by_split"]
    groups = d["fire_rate_by_group"]
    columns = list(dict.fromkeys(c for rates in groups.values() for c in rates))
    z = [[groups[p].get(c) for c in columns] for p in groups]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.18,
                        subplot_titles=("fire rate per split", "fire rate per pair and control group"))
    fig.add_trace(go.Bar(x=list(split.values()), y=list(split), orientation="h", marker_color="#1b9e77",
                         hovertemplate="%{y}: %{x:.2f}<extra></extra>", showlegend=False), row=1, col=1)
    fig.add_trace(go.Heatmap(z=z, x=columns, y=list(groups), zmin=0, zmax=1, colorscale="Viridis",
                             text=[[("" if v is None else f"{v:.2f}") for v in row] for row in z], texttemplate="%{text}",
                             colorbar=dict(title="fire rate"), hovertemplate="%{y} · %{x}: %{z:.2f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_layout(height=140 + 22 * len(split), margin=dict(l=130, r=20, t=50, b=150))
    return fig


def add_dashboard(page: Page, d: dict, linked: set[str] = frozenset()) -> None:
    """One latent's dashboard as a section of `page`; nearest latents in `linked` (anchors) become links."""
    page.add(f"<div class='dashboard' id='{d['anchor']}'>")
    page.heading(f"layer {d['layer']} · k {d['k']} · latent {d['latent']}")
    peak = max(d["max_activation"], 1e-8)
    page.add(legend_html(peak))
    page.add(examples_html("top activations on trigger prompts (poison, single, mismatch)", d["top_trigger"], peak))
    page.add(examples_html("top activations on generic text", d["top_generic"], peak))
    page.add(examples_html("examples across quantiles of its non-zero prompt scores", d["quantile_examples"], peak))
    page.add("<div class='cols'>")
    page.figure(density_figure(d))
    logits = d["logit_effect"]
    rows = [{"promoted": p["token"], "logit +": p["logit"], "suppressed": s["token"], "logit −": s["logit"]}
            for p, s in zip(logits["promoted"], logits["suppressed"])]
    page.add("<div><h4>logit effect of the decoder direction (final norm, unembedding; centred)</h4>"
             + frame_html(pd.DataFrame(rows)) + "</div>")
    near = []
    for r in d["nearest"]:
        a = anchor(r["layer"], r["k"], r["latent"])
        name = f"L{r['layer']} k{r['k']} #{r['latent']}"
        cell = f"<a href='#{a}'>{name}</a>" if a in linked else name
        near.append(f"<tr><td>{cell}</td><td>{r['cosine']:.3f}</td></tr>")
    page.add("<div><h4>nearest latents by decoder cosine</h4><table class='frame'><tr><th>latent</th><th>cosine</th></tr>"
             + "".join(near) + "</table></div></div>")
    page.figure(fire_rate_figure(d))
    page.add("</div>")


def write_dashboards(dashboards: list[dict], path: str | Path, title: str) -> Path:
    """One self-contained HTML page set holding several dashboards (plotly.js embedded once)."""
    page = Page(title, extra_css=DASHBOARD_CSS)
    linked = {d["anchor"] for d in dashboards}
    page.add("<p>" + " · ".join(f"<a href='#{d['anchor']}'>L{d['layer']} k{d['k']} #{d['latent']}</a>" for d in dashboards) + "</p>")
    for d in dashboards:
        add_dashboard(page, d, linked)
    return write_text(path, page.render())


def show_dashboard(d: dict) -> None:
    """Draw a dashboard in a Jupyter notebook (figures through plotly's notebook renderer)."""
    from IPython.display import HTML, display

    peak = max(d["max_activation"], 1e-8)
    display(HTML(f"<style>{DASHBOARD_CSS}</style><h3>layer {d['layer']} · k {d['k']} · latent {d['latent']}</h3>" + legend_html(peak)
                 + examples_html("top activations on trigger prompts", d["top_trigger"], peak)
                 + examples_html("top activations on generic text", d["top_generic"], peak)
                 + examples_html("examples across quantiles", d["quantile_examples"], peak)))
    density_figure(d).show()
    fire_rate_figure(d).show()
    logits = d["logit_effect"]
    display(HTML("<b>promoted</b> " + html.escape(" · ".join(repr(p["token"]) for p in logits["promoted"]))
                 + "<br><b>suppressed</b> " + html.escape(" · ".join(repr(p["token"]) for p in logits["suppressed"]))
                 + "<br><b>nearest</b> " + html.escape(" · ".join(f"L{r['layer']}k{r['k']}#{r['latent']} ({r['cosine']:.2f})" for r in d["nearest"]))))


def run_latent(cfg: LatentConfig) -> dict:
    """`diffkit latent`: the dashboards of the given latents of one SAE, as one HTML page set."""
    if not cfg.latent:
        raise DiffkitError("name the latent(s) to show, e.g. --latent 17 or --latent 17,40")
    run = resolve_options(cfg)
    entry = run.entry(cfg.layer, cfg.k)
    collection = Collection(cfg.n_prompts, cfg.n_null, cfg.seed, k=cfg.k)
    activations = load_activations(run, [entry.layer], collection, resolve_device(cfg.device), cfg.batch_size)[entry.layer]
    finetuned = load_model(run.finetuned)
    dashboards = [latent_dashboard(run, entry.layer, j, cfg.k, activations, finetuned=finetuned, n_examples=cfg.examples)
                  for j in cfg.latent]
    out = Path(cfg.out) if cfg.out else run.path / "analyses" / "latents" / f"L{entry.layer}_k{entry.k}_{'_'.join(map(str, cfg.latent))}.html"
    write_dashboards(dashboards, out, f"diffkit latents: {run.path.name}, layer {entry.layer}, k {entry.k}")
    if not cfg.json:
        for d in dashboards:
            promoted = ", ".join(repr(p["token"]) for p in d["logit_effect"]["promoted"][:5])
            print(f"layer {d['layer']} latent {d['latent']}: fires on {100 * d['density']['fraction_firing']:.2f}% of tokens, "
                  f"max {d['max_activation']:.2f}; promotes {promoted}")
        print(f"wrote {out}")
    return {"html": str(out), "dashboards": dashboards}
