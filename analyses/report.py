"""`diffkit report`: one self-contained HTML file per run with every figure and table.

plotly.js is embedded once in the page head, so the file opens offline and stays one file. Script
errors are caught on the page and listed in a visible box (id "js-errors"), so a broken figure
shows up in a browser and in headless tests alike.
"""

from __future__ import annotations

import html

import pandas as pd
from plotly.offline import get_plotlyjs

from analyses import plots
from analyses.attribute import TABLE_COLUMNS, ablation_prompts, attribute_table, fill_ablation_effects, selective_ablation
from analyses.configs import ReportConfig
from analyses.grid import grid_summary
from analyses.ranking import __doc__ as RANKING_DOC
from analyses.stats import Collection, load_activations, load_run_pair, write_latent_stats
from diffkit.files import write_text
from diffkit.metrics import flatten
from diffkit.run import load_run


PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 2em; }
table.frame { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
table.frame td, table.frame th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
table.frame th { background: #f0f0f0; }
pre.doc { white-space: pre-wrap; background: #f7f7f7; padding: 10px; font-size: 0.85em; }
.scroll { overflow-x: auto; }
#js-errors { color: #b00; font-family: monospace; }
#js-errors:empty { display: none; }
"""

# Registered before plotly.js so that its errors, and every figure's, are caught too.
ERROR_CATCHER = """
window.addEventListener('error', function (e) {
  var box = document.getElementById('js-errors');
  if (box) { box.textContent += 'script error: ' + e.message + '\\n'; }
});
"""


def frame_html(frame: pd.DataFrame) -> str:
    table = frame.to_html(classes="frame", index=False, float_format=lambda v: f"{v:.3f}", na_rep="", border=0)
    return f"<div class='scroll'>{table}</div>"


class Page:
    """Sections of the report, each figure a div that shares the one embedded plotly.js."""

    def __init__(self, title: str):
        self.title, self.parts, self.n_figures = title, [], 0

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def heading(self, text: str, level: int = 2) -> None:
        self.add(f"<h{level}>{html.escape(text)}</h{level}>")

    def figure(self, fig) -> None:
        self.n_figures += 1
        self.add(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.n_figures}"))

    def render(self) -> str:
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{PAGE_CSS}{plots.EXAMPLE_CSS}</style><script>{ERROR_CATCHER}</script>"
                f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
                f"<h1>{html.escape(self.title)}</h1><pre id='js-errors'></pre>{''.join(self.parts)}</body></html>\n")


def run_section(page: Page, run) -> None:
    spec = run.spec
    page.add(f"<p>base <code>{html.escape(run.base)}</code> · fine-tuned <code>{html.escape(run.finetuned)}</code> · "
             f"layers {', '.join(map(str, run.layers))} · SAEs: "
             + ", ".join(f"layer {e.layer} k {e.k}" for e in run.saes) + "</p>")
    pairs = pd.DataFrame([{"pair": p.id, "words": p.name, "related": p.related, "charged": p.charged} for p in spec.pairs])
    page.add(frame_html(pairs))
    metrics = run.record.get("metrics") or {}
    rows = [{"sae": name, **flatten(values)} for name, values in metrics.items() if isinstance(values, dict)]
    if rows:
        page.heading("SAE metrics (held-out tokens)", 3)
        page.add(frame_html(pd.DataFrame(rows)))


def run_report(cfg: ReportConfig) -> dict:
    from diffkit.devices import resolve_device
    from diffkit.guard import check_output_dir, check_output_file

    run = load_run(cfg.run)
    out = check_output_file(cfg.out) if cfg.out else check_output_dir(run.path) / "report.html"
    spec = run.spec
    device = resolve_device(cfg.device)
    models = load_run_pair(run, device) if cfg.ablate > 0 else None
    activations = load_activations(run.path, cfg.layers, Collection(cfg.n_prompts, cfg.n_null, cfg.seed, k=cfg.k),
                                   device, cfg.batch_size, pair=models, progress=not cfg.json)
    stats_files = write_latent_stats(run.path, activations, spec)
    summary, overlaps, rankings = grid_summary(activations, spec, cfg.top, cfg.target_auroc)

    page = Page(f"diffkit report: {run.path.name}")
    run_section(page, run)
    page.heading("Trigger pairs across the relatedness × charged-ness grid")
    page.add(frame_html(summary.drop(columns=["pair_id", "related", "charged"])))
    for L, overlap in overlaps.items():
        page.heading(f"layer {L}", 3)
        page.figure(plots.grid_figure(summary[summary["layer"] == L], overlap))
    if len(overlaps) > 1:
        page.figure(plots.layer_figure(summary))

    prompts = ablation_prompts(spec, cfg.n_ablate_prompts, cfg.seed) if cfg.ablate > 0 else []
    saes = {L: run.sae(L, cfg.k)[1].to(device).eval() for L in activations} if cfg.ablate > 0 else {}
    tables = {}
    for pair in spec.pairs:
        page.heading(f"pair {pair.id}: {pair.name} ({pair.grid_cell})")
        table = attribute_table(activations, spec, pair, cfg.top, {L: rankings[L][pair.id] for L in activations})
        if cfg.ablate > 0:
            own = [p for p in prompts if p.condition == "poison" and p.pair_id == pair.id]
            for L, sae in saes.items():
                fill_ablation_effects(table, table.index[table["layer"] == L][: cfg.ablate], models, sae, L, own, spec,
                                      cfg.batch_size)
        tables[pair.name] = table
        page.add(frame_html(table[TABLE_COLUMNS]))
        for L, a in activations.items():
            latents = table.loc[table["layer"] == L, "latent"].astype(int).tolist()
            scores = a.prompt_scores()
            page.heading(f"layer {L}", 3)
            page.figure(plots.latent_split_heatmap(plots.split_table(scores, a.sequences, spec, latents),
                                                   f"layer {L}: share of each split's prompts where the top latents fire"))
            page.figure(plots.activation_histograms(scores, a.sequences, spec, latents[0],
                                                    f"layer {L}, latent {latents[0]}: max activation per prompt"))
            page.add(plots.top_examples_html(a, latents[0], n=6))
    selective = {}
    if saes:
        page.heading("Pair-selective ablation: does each pair have latents of its own?")
        for L, sae in saes.items():
            selective[L] = selective_ablation(models, sae, L, spec, cfg.ablate, cfg.n_ablate_prompts, cfg.seed,
                                              cfg.batch_size)
            page.figure(plots.selective_ablation_figure(selective[L], spec, L))
    page.heading("How latents are ranked")
    page.add(f"<pre class='doc'>{html.escape(RANKING_DOC.strip())}</pre>")

    write_text(out, page.render())
    result = {
        "report": str(out),
        "figures": page.n_figures,
        "latent_stats": [str(p) for p in stats_files],
        "top_latents": {name: t.groupby("layer")["latent"].first().to_dict() for name, t in tables.items()},
        "selective_ablation": {L: {p: {"latents": r["latents"], "asr_after": r.get("asr_after")} for p, r in res.items()}
                               for L, res in selective.items()},
    }
    if not cfg.json:
        print(f"wrote {out} ({page.n_figures} figures, {out.stat().st_size / 1e6:.1f} MB)")
    return result
