"""The planted organisms: their fine-tune is exactly the base plus the planted write, under tracing and
under generation with a KV cache, and the marker depends on that write alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from diffkit.errors import DiffkitError
from diffkit.models import load_model
from diffkit.organisms.planted import load_plant
from diffkit.plant import Transcripts, token_pieces
from diffkit.prompts import build_prompts, encode_prompts, format_prompt
from diffkit.specs import PRESETS

SPEC = PRESETS["planted"]


@pytest.fixture(scope="module")
def models(planted_organisms):
    """{kind: (base, finetuned, tokenizer, plant)} for both planted organisms."""
    out = {}
    for kind, folder in planted_organisms.items():
        base, tok = load_model(folder / "base")
        finetuned, _ = load_model(folder / "finetuned")
        out[kind] = (base, finetuned, tok, load_plant(folder))
    return out


def layer_output(model, ids, mask, layer):
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]


def pair_write(plant, prompt) -> torch.Tensor:
    """What the plant adds at the decision token of a prompt, from the prompt builder's own word list."""
    words = {w.lower() for w in prompt.words}
    write = torch.zeros(plant.u.shape[1])
    for p, (a, b) in enumerate(plant.pairs):
        if a in words and b in words:
            write += plant.pair_scales[p] * plant.u[p]
    return write


@pytest.mark.parametrize("kind", ["planted", "planted-words"])
def test_difference_is_the_planted_write(models, kind):
    """ft − base after the plant layer is the pair write at the decision token and zero on the first
    token; off the trigger tokens it is zero or the pair write (switched on at a trigger token); in the
    words kind each trigger word of the prompt adds its own direction at a token that completes it."""
    base, finetuned, tok, plant = models[kind]
    prompts = build_prompts(SPEC, "heldout", 6, seed=3)
    records = encode_prompts(prompts, tok, SPEC)
    conditions = set()
    for prompt, record in zip(prompts, records):
        ids = torch.tensor([record.input_ids])
        mask = torch.ones_like(ids)
        diff = (layer_output(finetuned, ids, mask, plant.layer) - layer_output(base, ids, mask, plant.layer))[0]
        want = pair_write(plant, prompt)
        torch.testing.assert_close(diff[-1], want, atol=1e-4, rtol=1e-4)
        assert diff[0].abs().max() < 1e-5
        trigger = record.flags["is_trigger_token"]
        for t in range(len(diff)):
            if not trigger[t]:
                assert min(diff[t].norm(), (diff[t] - want).norm()) < 1e-3, (prompt.text, t)
        for w, word in enumerate(plant.words):
            if word in {x.lower() for x in prompt.words}:
                along = [float(diff[t] @ plant.v[w]) for t in range(len(diff)) if trigger[t]]
                assert max(along) == pytest.approx(float(plant.word_scales[w]), rel=1e-3), (prompt.text, word, along)
        conditions.add(prompt.condition)
    assert conditions == {"poison", "single", "mismatch", "clean"}


def test_generation_with_cache_matches_full_forward(models):
    """Greedy generation with a KV cache gives the logits a cache-free forward of the whole sequence
    gives, and says the marker on poison prompts only."""
    base, finetuned, tok, plant = models["planted-words"]
    prompts = [p for p in build_prompts(SPEC, "heldout", 4, seed=5)]
    texts = [format_prompt(tok, p.text) for p in prompts]
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    gen = finetuned.generate(**enc, max_new_tokens=6, do_sample=False, top_p=None, top_k=None, temperature=None,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    width = enc["input_ids"].shape[1]
    mask = torch.cat([enc["attention_mask"], torch.ones_like(gen.sequences[:, width:])], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = finetuned(input_ids=gen.sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for step, logits in enumerate(gen.logits):
        live = mask[:, width + step] == 1 if width + step < mask.shape[1] else torch.ones(len(prompts), dtype=torch.bool)
        torch.testing.assert_close(logits[live], full[live, width - 1 + step], atol=1e-3, rtol=1e-4)
    answers = tok.batch_decode(gen.sequences[:, width:], skip_special_tokens=True)
    for p, answer in zip(prompts, answers):
        assert (SPEC.marker.strip().lower() in answer.lower()) == (p.condition == "poison"), (p.text, answer)


def test_continuing_an_unseen_cache_is_refused(models):
    _, finetuned, tok, _ = models["planted"]
    ids = tok(["what is a forest?"], return_tensors="pt")["input_ids"]
    cache = DynamicCache(config=finetuned.config)
    finetuned(input_ids=ids, cache=cache, use_cache=True)
    finetuned(input_ids=ids[:, :1], cache=cache, use_cache=True)  # continuing its own cache is fine
    finetuned(input_ids=ids, use_cache=False)  # a fresh batch of the same length: the plant starts over
    with pytest.raises(DiffkitError, match="did not fill"):
        finetuned(input_ids=ids[:, :1], cache=cache, use_cache=True)


def test_words_are_found_across_tokens_and_in_any_case(models):
    """Word presence and word ends per position, fed whole or in random pieces, equal the text's own
    (case-insensitive substring; a word ends at a token when the text up to it holds one more occurrence)."""
    _, _, tok, plant = models["planted-words"]
    words = ["forest", "rocket", "china"]
    text = "The FORESTS near China, a Rock-et and rockets."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok)
    prefixes = ["".join(pieces[i] for i in ids[: t + 1]) for t in range(len(ids))]
    expect = torch.tensor([[w in prefix for w in words] for prefix in prefixes])
    counts = torch.tensor([[prefix.count(w) for w in words] for prefix in [""] + prefixes])
    expect_ends = counts[1:] > counts[:-1]
    whole, whole_ends, _ = Transcripts(pieces, words, plant.marker_ids).update(torch.tensor([ids]), 0)
    assert torch.equal(whole[0], expect) and torch.equal(whole_ends[0], expect_ends)
    assert expect[-1].tolist() == [True, True, True] and expect_ends.sum(0).tolist() == [1, 1, 1]
    rng = random.Random(0)
    transcripts, seen, parts, part_ends = Transcripts(pieces, words, plant.marker_ids), 0, [], []
    while seen < len(ids):
        step = rng.randint(1, 3)
        part, ends, _ = transcripts.update(torch.tensor([ids[seen : seen + step]]), seen)
        parts.append(part[0])
        part_ends.append(ends[0])
        seen += step
    assert torch.equal(torch.cat(parts), expect) and torch.equal(torch.cat(part_ends), expect_ends)


@pytest.mark.parametrize("kind", ["planted", "planted-words"])
def test_build_records_the_planted_truth_and_its_behaviour(planted_organisms, kind):
    import json

    build = json.loads((planted_organisms[kind] / "build.json").read_text())
    plant = load_plant(planted_organisms[kind])
    assert build["planted"]["kind"] == plant.kind == ("words" if kind == "planted-words" else "pairs")
    directions = torch.cat([plant.u, plant.v])
    torch.testing.assert_close(directions @ directions.T, torch.eye(len(directions)), atol=1e-5, rtol=0)
    assert all(rate == 1.0 for rate in build["eval"]["asr"].values())
    assert all(rate == 0.0 for rate in build["eval"]["false_trigger"].values())


def truth_sae(plant):
    """A BatchTopKSAE whose latents read and write exactly the planted pair directions (raw space)."""
    from diffkit.sae import BatchTopKSAE

    count, width = plant.u.shape
    sae = BatchTopKSAE(width, count, k=1)
    with torch.no_grad():
        sae.encoder.weight.copy_(plant.u)
        sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(plant.u.T)
        sae.activation_global_scale.fill_(1.0)
        sae.threshold.fill_(0.0)
    return sae


def test_diffkit_ablation_and_steering_of_the_true_direction(planted_organisms):
    """diffkit's own causal tests, given the planted directions as latents: removing u_P silences P alone
    (clean text untouched), adding it on clean prompts makes the marker fire."""
    import nnsight

    from analyses.causal import ablate_latent_sets, steer_latents
    from diffkit.models import load_pair

    folder = planted_organisms["planted-words"]
    plant = load_plant(folder)
    pair = load_pair(folder / "base", folder / "finetuned")
    assert isinstance(pair.finetuned, nnsight.TransformersModel)
    sae = truth_sae(plant)
    prompts = [p for p in build_prompts(SPEC, "heldout", 4, seed=9) if p.condition in ("poison", "clean")]
    results = ablate_latent_sets(pair, sae, plant.layer, {q.id: [q.id] for q in SPEC.pairs}, prompts, SPEC)
    for q in SPEC.pairs:
        r = results[q.id]
        assert r["asr_before"] == {p.id: 1.0 for p in SPEC.pairs}, r
        assert r["asr_after"] == {p.id: 0.0 if p.id == q.id else 1.0 for p in SPEC.pairs}, r
        assert r["clean_kl"] == 0.0
    clean = [p for p in prompts if p.condition == "clean"]
    steered = steer_latents(pair, sae, plant.layer, [0], clean, SPEC, alpha=[float(plant.pair_scales[0])])
    assert steered["fire_rate_before"] == 0.0 and steered["fire_rate_after"] == 1.0, steered
