"""`diffkit report`: one self-contained HTML file per run with every figure and table, and beside it
one page set with the dashboard of every latent the report ranks (analyses/page.py: plotly.js
embedded once per file, script errors listed on the page)."""

from __future__ import annotations

import html

import pandas as pd

from analyses import plots
from analyses.attribute import TABLE_COLUMNS, ablation_prompts, attribute_table, fill_ablation_effects, selective_ablation
from analyses.configs import ReportConfig
from analyses.dashboard import anchor, latent_dashboard, write_dashboards
from analyses.fidelity import __doc__ as FIDELITY_DOC
from analyses.fidelity import fidelity_summary
from analyses.grid import grid_summary
from analyses.page import Page, frame_html
from analyses.ranking import __doc__ as RANKING_DOC
from analyses.stats import Collection, load_activations, load_run_pair, write_latent_stats
from diffkit.files import write_text
from diffkit.history import read_history
from diffkit.metrics import flatten
from diffkit.models import load_model
from diffkit.sae_sources import resolve_options


def run_section(page: Page, run) -> None:
    spec = run.spec
    page.add(f"<p>base <code>{html.escape(run.base)}</code> · fine-tuned <code>{html.escape(run.finetuned)}</code> · "
             f"layers {', '.join(map(str, run.layers))} · SAEs: "
             + ", ".join(f"layer {e.layer} k {e.k}" for e in run.saes) + "</p>")
    pairs = pd.DataFrame([{"pair": p.id, "words": p.name, "related": p.related, "charged": p.charged} for p in spec.pairs])
    page.add(frame_html(pairs))
    metrics = {name: values for name, values in (run.record.get("metrics") or {}).items() if isinstance(values, dict)}
    rows = [{"sae": name, **flatten({m: v for m, v in values.items() if m != "spliced"}),
             **{f"spliced_{m}": v for m, v in fidelity_summary(values.get("spliced")).items()}}
            for name, values in metrics.items()]
    if rows:
        page.heading("SAE metrics (held-out tokens)", 3)
        page.add(frame_html(pd.DataFrame(rows)))
    spliced = {name: values["spliced"] for name, values in metrics.items() if values.get("spliced")}
    if spliced:
        page.heading("Spliced-in fidelity: does the reconstruction carry the fine-tune?", 3)
        page.add(f"<pre class='doc'>{html.escape(FIDELITY_DOC.strip())}</pre>")
        page.add(frame_html(pd.DataFrame([{"sae": name, **flatten({"kl_recovered": s["kl_recovered"],
                                                                   "kl_recovered_zeroed": s["kl_recovered_zeroed"]})}
                                          for name, s in spliced.items()])))
        page.add(frame_html(pd.DataFrame([{"sae": name, "asr": variant, **rates} for name, s in spliced.items()
                                          for variant, rates in s["asr"].items()])))
        page.figure(plots.fidelity_figure(spliced))
    history = read_history(run.path)
    if len(history):
        page.heading("Training history", 3)
        page.figure(plots.history_figure(history))


def run_report(cfg: ReportConfig) -> dict:
    from diffkit.devices import resolve_device
    from diffkit.guard import check_output_dir, check_output_file

    run = resolve_options(cfg)
    out = check_output_file(cfg.out) if cfg.out else check_output_dir(run.path) / "report.html"
    spec = run.spec
    device = resolve_device(cfg.device)
    models = load_run_pair(run, device) if cfg.ablate > 0 else None
    activations = load_activations(run, cfg.layers, Collection(cfg.n_prompts, cfg.n_null, cfg.seed, k=cfg.k),
                                   device, cfg.batch_size, pair=models, progress=not cfg.json)
    stats_files = write_latent_stats(run.path, activations, spec)
    summary, overlaps, rankings = grid_summary(activations, spec, cfg.top, cfg.target_auroc)

    latents_page = out.with_name(f"{out.stem}_latents.html")
    k_of = {L: run.entry(L, cfg.k).k for L in activations}
    page = Page(f"diffkit report: {run.source or run.path.name}")
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
        page.add(frame_html(table[TABLE_COLUMNS], links={"latent": lambda row: f"{latents_page.name}#"
                                                         + anchor(int(row["layer"]), k_of[int(row["layer"])], int(row["latent"]))}))
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

    ranked = sorted({(int(r["layer"]), int(r["latent"])) for t in tables.values() for r in t.to_dict("records")})
    finetuned = (models.finetuned_hf, models.tokenizer) if models is not None else load_model(run.finetuned)
    dashboards = [latent_dashboard(run, L, j, cfg.k, activations[L], finetuned=finetuned) for L, j in ranked]
    write_dashboards(dashboards, latents_page, f"diffkit latents: {run.path.name} (every latent the report ranks)")
    write_text(out, page.render())
    result = {
        "report": str(out),
        "figures": page.n_figures,
        "latents_page": str(latents_page),
        "latent_dashboards": len(dashboards),
        "latent_stats": [str(p) for p in stats_files],
        "top_latents": {name: t.groupby("layer")["latent"].first().to_dict() for name, t in tables.items()},
        "selective_ablation": {L: {p: {"latents": r["latents"], "asr_before": r.get("asr_before"),
                                       "asr_after": r.get("asr_after")} for p, r in res.items()}
                               for L, res in selective.items()},
    }
    if not cfg.json:
        print(f"wrote {out} ({page.n_figures} figures, {out.stat().st_size / 1e6:.1f} MB)")
    return result
