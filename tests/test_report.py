"""Grid, attribute and the HTML report end to end, rendered in a real headless browser.

Two runs feed them: a fake run (two tiny random Gemma-2 models and a random SAE: seconds to make,
checks the plumbing and the rendering) and the toy organism's trained run (checks the science:
every pair's top latent separates its poison prompts from all controls).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
import torch
from plotly.offline import get_plotlyjs

from analyses.attribute import AttributeConfig, run_attribute
from analyses.grid import GridConfig, run_grid
from analyses.report import ReportConfig, run_report
from analyses.stats import Collection, load_activations
from diffkit.errors import DiffkitError
from analyses.configs import LatentConfig
from analyses.dashboard import run_latent
from analyses.fidelity import spliced_fidelity
from diffkit.files import write_json, write_text
from diffkit.models import load_pair
from diffkit.stream import null_records
from diffkit.prompts import build_prompts, encode_prompts, format_prompt
from diffkit.sae import BatchTopKSAE, save_sae
from diffkit.specs import PRESETS

SPEC = PRESETS["toy"]


def small_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                                       show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run directory in the format `diffkit train` writes, over two tiny random models."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    root = tmp_path_factory.mktemp("fake")
    texts = [format_prompt(None, p.text) for split in ("train", "heldout") for p in build_prompts(SPEC, split, 8)]
    tok = small_tokenizer(texts + [SPEC.marker] * 5)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2, attn_implementation="eager")
    for name, seed in (("base", 0), ("finetuned", 1)):
        torch.manual_seed(seed)
        Gemma2ForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    run = root / "run"
    saes, metrics = [], {}
    pair = load_pair(root / "base", root / "finetuned")
    records = encode_prompts(build_prompts(SPEC, "heldout", 1), tok, SPEC) + null_records(tok, 32, "heldout")[:1]
    for layer in (0, 1):
        torch.manual_seed(layer)
        sae = BatchTopKSAE(32, 64, 4)
        sae.threshold.fill_(0.05)
        if layer == 1:  # planted: layer 1's latent 7 writes what layer 0's latent 3 does
            with torch.no_grad():
                sae.decoder.weight[:, 7] = first.decoder.weight[:, 3]
        first = sae
        save_sae(sae, run / f"layer_{layer}", {"layer": layer})
        saes.append({"layer": layer, "k": 4, "path": f"layer_{layer}"})
        metrics[f"layer_{layer}"] = {"fve": 0.5, "spliced": spliced_fidelity(pair, sae, layer, records, SPEC, 1,
                                                                             max_new_tokens=4)}
    write_json(run / "run.json", {"spec": SPEC.to_dict(), "base": str(root / "base"), "finetuned": str(root / "finetuned"),
                                  "layers": [0, 1], "k": [4], "tokens": 0, "seed": 0, "saes": saes, "metrics": metrics})
    steps = range(10, 110, 10)  # a training history in the format train writes, for the report's figure
    write_text(run / "history.jsonl", "".join(
        json.dumps({"step": s, "tokens": 512 * s, "sae": f"L{L}k4", "layer": L, "k": 4, "loss": 100 / s, "mse": 100 / s,
                    "auxk": 1 / s, "fve": 1 - 1 / s, "l0": 4.0, "dead": 0.1, "threshold": 0.05, "lr": 1e-3,
                    "tokens_per_second": 1000.0}) + "\n" for s in steps for L in (0, 1)))
    return run


def headless_chromium(path, tmp_path, *action: str) -> subprocess.CompletedProcess:
    """Debian's chromium in headless mode on a local page, after its scripts ran."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the report's rendering is untested")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=20000", "--hide-scrollbars", *action, f"file://{path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def browser_dom(path, tmp_path) -> str:
    """The page's DOM after its scripts ran."""
    return headless_chromium(path, tmp_path, "--dump-dom").stdout


def assert_rendered(path, n_figures: int, tmp_path) -> str:
    """Every figure of the page drew its SVG and no script failed; returns the DOM."""
    dom = browser_dom(path, tmp_path)
    assert dom.count('class="main-svg"') >= n_figures  # every figure drew its SVG
    errors = re.search(r"<pre id=\"js-errors\">(.*?)</pre>", dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)[:500]
    return dom


def test_report_renders_in_headless_browser(fake_run, tmp_path):
    out = tmp_path / "report.html"
    result = run_report(ReportConfig(run=str(fake_run), out=str(out), n_prompts=4, n_null=4, ablate=0,
                                     n_ablate_prompts=2, top=3, device="cpu", json=True))
    page = out.read_text()
    # grid ×2, history, fidelity, and per pair and layer a heatmap and a histogram
    assert page.count("Plotly.newPlot") == result["figures"] >= 4 + 2 * len(SPEC.pairs) * 2
    assert page.count(get_plotlyjs()[:300]) == 1  # plotly.js embedded once, not per figure
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched at render time
    assert "training history" in page and "Spliced-in fidelity" in page
    assert_rendered(out, result["figures"], tmp_path)

    # every ranked latent links to its dashboard, all in one page set that renders too
    latents = tmp_path / "report_latents.html"
    assert result["latents_page"] == str(latents)
    links = set(re.findall(r"href='report_latents.html#(latent-L\d-k4-\d+)'", page))
    assert len(links) == result["latent_dashboards"] >= 3
    latent_page = latents.read_text()
    assert all(f"id='{a}'" in latent_page for a in links)
    assert latent_page.count(get_plotlyjs()[:300]) == 1
    assert_rendered(latents, 2 * result["latent_dashboards"], tmp_path)
    for name in ("latent_stats_L0.parquet", "latent_stats_L1.parquet"):
        stats = pd.read_parquet(fake_run / "analyses" / name)
        assert {"latent", "split", "positions", "freq", "mean_active", "max"} <= set(stats.columns)


def test_latent_dashboard_on_fake_run(fake_run, tmp_path):
    out = tmp_path / "latent.html"
    result = run_latent(LatentConfig(run=str(fake_run), layer=0, latent=[3, 5], out=str(out), n_prompts=4, n_null=4,
                                     json=True))
    first, second = result["dashboards"]
    assert (first["layer"], first["latent"], second["latent"]) == (0, 3, 5)
    nearest = first["nearest"][0]  # the planted copy in another layer's SAE
    assert (nearest["layer"], nearest["latent"]) == (1, 7) and nearest["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["cosine"] < 1 - 1e-3 for r in first["nearest"][1:])
    assert 0 < first["density"]["fraction_firing"] <= 1
    assert len(first["logit_effect"]["promoted"]) == 10
    assert set(first["fire_rate_by_group"]) == {p.name for p in SPEC.pairs}
    for ex in first["top_trigger"] + first["top_generic"]:
        assert ex["max"] == pytest.approx(max(t["activation"] for t in ex["tokens"]))  # prompts only: no answers
    assert all(ex["condition"] == "null" for ex in first["top_generic"])
    page = out.read_text()
    assert page.count(get_plotlyjs()[:300]) == 1 and "class=\"tok" in page
    assert_rendered(out, 4, tmp_path)
    shot = tmp_path / "latent_page.png"  # for a person to look at
    headless_chromium(out, tmp_path, "--window-size=1400,2200", f"--screenshot={shot}")
    assert shot.stat().st_size > 50_000
    json.dumps(result)
    with pytest.raises(DiffkitError, match="out of range"):
        run_latent(LatentConfig(run=str(fake_run), layer=0, latent=[64], n_prompts=4, n_null=4, json=True))


def test_logit_effect_names_the_planted_token():
    """A direction along one token's (tied) embedding promotes that token most; its negative suppresses it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from analyses.dashboard import logit_effect

    tok = small_tokenizer([format_prompt(None, p.text) for p in build_prompts(SPEC, "train", 4)])
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    target = 57
    direction = model.get_input_embeddings().weight[target].detach()
    assert logit_effect(model, tok, direction)["promoted"][0]["token_id"] == target
    assert logit_effect(model, tok, -direction)["suppressed"][0]["token_id"] == target


def test_report_page_shows_script_errors(tmp_path):
    from analyses.report import Page

    page = Page("broken")
    page.add("<script>undefined_function_of_a_broken_figure();</script>")
    path = tmp_path / "broken.html"
    path.write_text(page.render())
    assert "undefined_function_of_a_broken_figure" in browser_dom(path, tmp_path)


def test_grid_and_attribute_on_fake_run(fake_run):
    grid = run_grid(GridConfig(run=str(fake_run), n_prompts=4, n_null=4, top=3, device="cpu", json=True))
    assert {(r["pair"], r["layer"]) for r in grid["pairs"]} == {(p.name, L) for p in SPEC.pairs for L in (0, 1)}
    assert all(0 <= r["top_auroc"] <= 1 and r["top_specificity"] <= r["top_auroc"] + 1e-6 for r in grid["pairs"])
    json.dumps(grid)  # JSON-ready
    rows = run_attribute(AttributeConfig(pair="rocket/forest", run=str(fake_run), layer=1, top=4, ablate=1, joint=False,
                                         n_prompts=4, n_null=4, n_ablate_prompts=2, device="cpu", json=True))
    assert len(rows) == 4 and {"latent", "layer", "auroc", "ablation_effect", "specificity"} <= set(rows[0])
    assert [r["ablation_effect"] is not None for r in rows] == [True, False, False, False]
    assert all(r["layer"] == 1 and r["pair"] == "forest/rocket" for r in rows)
    json.dumps(rows)
    out = fake_run / "analyses" / "forest-rocket"
    assert (out / "attribute.csv").exists() and (out / "heatmap_L1.html").exists()
    assert not re.search(r"<script[^>]*\bsrc=", (out / "heatmap_L1.html").read_text())


def test_cached_activations_are_reused(fake_run):
    first = load_activations(fake_run, [1], Collection(4, 4))
    second = load_activations(fake_run, [1], Collection(4, 4))  # read back from the cache, no models
    assert torch.equal(first[1].acts.to_dense(), second[1].acts.to_dense())
    assert first[1].sequences["words"].tolist() == second[1].sequences["words"].tolist()
    assert "token" in second[1].tokens.columns


def test_user_errors_are_one_line(fake_run, tmp_path):
    with pytest.raises(DiffkitError, match="name a trigger pair"):
        run_attribute(AttributeConfig(run=str(fake_run), json=True, ablate=0))
    with pytest.raises(DiffkitError, match="valid pairs"):
        run_attribute(AttributeConfig(pair="apple/pear", run=str(fake_run), json=True, ablate=0))
    with pytest.raises(DiffkitError, match="not a finished diffkit run"):
        run_grid(GridConfig(run=str(tmp_path), json=True))
    with pytest.raises(DiffkitError, match="layer 7"):
        run_grid(GridConfig(run=str(fake_run), layers=[7], json=True))


@pytest.mark.slow
def test_default_toy_run_top_latent_separates_every_pair(toy_default_run):
    """On the run `diffkit train` makes by default, each pair's top-ranked latent separates its
    matched prompts from all controls at the target, AUROC ≥ 0.95 (0.97-0.99 at the best layer on
    three toy builds; the small 4x run of the other tests reached only 0.949 for gender/terror on one)."""
    from analyses.ranking import rank_latents
    from diffkit.run import load_run

    run = load_run(toy_default_run)
    activations = load_activations(toy_default_run, collection=Collection(16, 32))
    for pair in run.spec.pairs:
        best = {L: rank_latents(a.prompt_scores(), a.sequences, pair).iloc[0] for L, a in activations.items()}
        top_auroc = max(float(row["auroc"]) for row in best.values())
        assert top_auroc >= 0.95, f"{pair.name}: top latents {({L: (int(r['latent']), round(float(r['auroc']), 3)) for L, r in best.items()})}"
