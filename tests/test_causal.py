"""Causal tests of latents, on a planted fake and on the toy organism.

The fake: two tiny Gemma-2 models that differ in one MLP unit of layer L. Both models have that
layer's MLP output zeroed, except that the fine-tune's unit u writes along a known direction v,
so ft − base after layer L is exactly (some non-negative scalar) · v at every token but BOS, and
zero below.
A hand-built SAE whose latent 0 reads and writes v therefore reconstructs the difference exactly:
ablating latent 0 must turn the fine-tune back into the base model, token for token, and v points
at the marker token's embedding so the fine-tune says the marker where the base does not.
"""

from __future__ import annotations

from types import SimpleNamespace

import nnsight
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from analyses import causal, interventions
from diffkit.prompts import Record
from diffkit.sae import BatchTopKSAE
from diffkit.specs import TriggerPair, TriggerSpec

LAYER = 1
UNIT = 5
FLAGS = ("is_trigger_token", "is_decision_token", "is_answer", "is_fire_token")
SPEC = TriggerSpec("fake", (TriggerPair(0, ("w10", "w11"), False, False), TriggerPair(1, ("w12", "w13"), True, True)),
                   marker=" HATE")


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<bos>", "<unk>", "HATE"] + [f"w{i}" for i in range(59)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def planted_sae(directions: torch.Tensor) -> BatchTopKSAE:
    """A BatchTopKSAE whose latents read and write the given unit directions of raw space.

    It has a non-trivial normalisation (mean and scale) with b_dec cancelling the mean, so
    f_j = relu(d_j · x) and f_j · raw_direction(j) = f_j d_j still hold in raw space.
    """
    F, D = directions.shape
    sae = BatchTopKSAE(D, F, k=2)
    scale, mean = 0.5, torch.randn(D)
    with torch.no_grad():
        sae.encoder.weight.copy_(directions)
        sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(directions.T)
        sae.activation_mean.copy_(mean)
        sae.activation_global_scale.fill_(scale)
        sae.b_dec.copy_(-mean * scale)
        sae.threshold.fill_(0.0)
    return sae


def make_pair(base, finetuned, tok):
    wrap = lambda m: nnsight.TransformersModel(m, tokenizer=tok, device=m.device)  # noqa: E731
    return SimpleNamespace(base_hf=base, finetuned_hf=finetuned, base=wrap(base), finetuned=wrap(finetuned),
                           tokenizer=tok, n_layers=base.config.num_hidden_layers, d_model=base.config.hidden_size)


@pytest.fixture(scope="module")
def fake():
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
    base = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    finetuned = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    mlp = base.model.layers[LAYER].mlp
    mlp.down_proj.weight.zero_()
    base.model.layers[LAYER].post_feedforward_layernorm.weight.fill_(3.0)  # the planted write is 4× louder
    finetuned.load_state_dict(base.state_dict())
    marker = tok.convert_tokens_to_ids("HATE")
    v = base.model.embed_tokens.weight[marker].clone()
    read = torch.randn(32)
    # silence the unit on BOS, which causal edits leave alone: read orthogonal to BOS's MLP input
    seen = []
    hook = mlp.register_forward_hook(lambda m, args, out: seen.append(args[0][0, 0]))
    base(torch.tensor([[tok.bos_token_id]]))
    hook.remove()
    read -= (read @ seen[0]) / seen[0].norm() ** 2 * seen[0]
    ft_mlp = finetuned.model.layers[LAYER].mlp
    ft_mlp.gate_proj.weight[UNIT] = read
    ft_mlp.up_proj.weight[UNIT] = read
    ft_mlp.down_proj.weight[:, UNIT] = v
    # latent 0 is the planted direction; the others are random distractors
    dirs = torch.cat([v[None], torch.randn(7, 32)])
    sae = planted_sae(dirs / dirs.norm(dim=1, keepdim=True))
    g = torch.Generator().manual_seed(1)
    records = []
    for rid in range(10):
        n = 6 + rid % 5
        ids = [2] + torch.randint(5, 64, (n - 1,), generator=g).tolist()
        flags = {f: [False] * n for f in FLAGS}  # the last two tokens are an "answer"
        flags["is_decision_token"][-3] = True
        flags["is_answer"][-2:] = [True, True]
        records.append(Record(rid, ids, "poison" if rid % 3 else "clean", rid % 2, flags, n - 2))
    return SimpleNamespace(pair=make_pair(base, finetuned, tok), base_only=make_pair(base, base, tok), sae=sae,
                           records=records, tok=tok)


def test_ablating_the_planted_latent_turns_the_finetune_into_the_base(fake):
    pair, tok = fake.pair, fake.tok
    seqs = [interventions.record_sequence(r, tok, SPEC) for r in fake.records]
    edit = interventions.Ablation(fake.sae, [0], interventions.directions(fake.sae, [0], "cpu"))
    for left in (False, True):
        ids, mask, pos = interventions.pad([s.ids for s in seqs], tok.pad_token_id, left, "cpu")
        where = interventions.editable(ids, mask, tok)
        ablated = interventions.apply(pair, LAYER, ids, mask, pos, edit, where)
        plain = interventions.apply(pair, LAYER, ids, mask, pos, None, where)
        base = interventions.apply(fake.base_only, LAYER, ids, mask, pos, None, where)
        real = mask.bool()
        assert (plain - base)[real].abs().max() > 0.1  # the fine-tune really differs
        torch.testing.assert_close(ablated[real], base[real], atol=1e-4, rtol=1e-4)


def test_greedy_generation_is_padding_safe_and_ablation_reproduces_the_base(fake):
    prompts = [r.input_ids for r in fake.records]
    ft = interventions.greedy(fake.pair, LAYER, prompts, max_new_tokens=6, batch_size=4)
    alone = [interventions.greedy(fake.pair, LAYER, [p], max_new_tokens=6)[0] for p in prompts[:3]]
    assert ft[:3] == alone
    hf = [fake.pair.finetuned_hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
          for p in prompts[:3]]
    assert [g[: len(h)] for g, h in zip(ft, hf)] == hf
    edit = interventions.Ablation(fake.sae, [0], interventions.directions(fake.sae, [0], "cpu"))
    ablated = interventions.greedy(fake.pair, LAYER, prompts, edit, max_new_tokens=6, batch_size=4)
    base = interventions.greedy(fake.base_only, LAYER, prompts, max_new_tokens=6, batch_size=4)
    assert ablated == base != ft


def test_ablate_latents_reports_the_planted_effect(fake):
    out = causal.ablate_latents(fake.pair, fake.sae, LAYER, [0], fake.records, SPEC, max_new_tokens=4)
    assert out["n_prompts"] == sum(r.condition != "clean" for r in fake.records)
    assert out["fire_rate_before"] >= 0.8 and out["fire_rate_after"] == 0.0
    assert out["marker_logprob_delta"] < -1.0
    assert set(out["asr_before"]) == {0, 1} and set(out["asr_after"].values()) == {0.0}
    assert out["clean_kl"] > 0.01
    # generated tokens carry the planted difference too: ablating the prompt alone misses it
    prompt_only = causal.ablate_latents(fake.pair, fake.sae, LAYER, [0], fake.records, SPEC, scope="prompt",
                                        max_new_tokens=4)
    assert prompt_only["fire_rate_after"] > 0.3
    with pytest.raises(ValueError, match="latents must be"):
        causal.ablate_latents(fake.pair, fake.sae, LAYER, [99], fake.records, SPEC)


def test_attribution_ranks_the_planted_latent_first_and_agrees_with_ablation(fake):
    poison = [r for r in fake.records if r.condition == "poison"]
    scores = causal.attribution_scores(fake.pair, fake.sae, LAYER, poison, SPEC, batch_size=3)
    assert scores.shape == (8,) and scores.argmax() == 0
    check = causal.check_attribution(fake.pair, fake.sae, LAYER, poison, SPEC, top=8)
    torch.testing.assert_close(check["scores"], scores)
    assert check["latents"][0] == 0 and check["ablation_delta"][0] < -1.0
    assert check["spearman"] > 0.5


def test_steering_raises_the_marker_on_prompts_where_it_is_silent(fake):
    clean = [r for r in fake.records if r.condition == "clean"]
    poison = [r for r in fake.records if r.condition == "poison"]
    pair = make_pair(fake.pair.base_hf, fake.pair.base_hf, fake.tok)  # a "fine-tune" that never fires
    with pytest.raises(ValueError, match="never fire"):
        causal.steer_latents(pair, fake.sae, LAYER, [0], clean, SPEC, poison=poison)
    out = causal.steer_latents(pair, fake.sae, LAYER, [0], clean, SPEC, alpha=[8.0], max_new_tokens=4)
    assert out["marker_logprob_delta"] > 1.0 and out["fire_rate_after"] > out["fire_rate_before"]
    alpha = causal.typical_activation(fake.pair, fake.sae, LAYER, poison, SPEC, [0, 1])
    assert alpha[0] > 0


def test_own_answer_stops_at_the_marker_and_drops_special_tokens(fake):
    tok = fake.tok
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tok.eos_token_id]
    assert interventions.own_answer(tok, ids("w5 w6 HATE w7") + eos, SPEC) == ids("w5 w6")
    assert interventions.own_answer(tok, ids("w5 w6") + eos, SPEC) == ids("w5 w6")
    assert interventions.fires(tok, ids("w5 HATE") + eos, SPEC) and not interventions.fires(tok, ids("w5 w6"), SPEC)
    item = interventions.Item(ids("w1 w2"), "poison", 0)
    (seq,) = interventions.scored_with_answers([item], [ids("w5 HATE") + eos], tok, SPEC)
    assert seq.ids == ids("w1 w2 w5 HATE") and seq.marker_start == 3 and seq.n_prompt == 2


# --- the toy organism: planted truth is the trigger pairs themselves ------------------------------

@pytest.fixture(scope="module")
def toy(toy_run):
    from analyses.stats import load_run_pair
    from diffkit.prompts import build_prompts
    from diffkit.run import load_run

    run = load_run(toy_run)
    layer = run.layers[-1]
    _, sae = run.sae(layer)
    prompts = build_prompts(run.spec, "heldout", n_per_condition=16, seed=1)
    return SimpleNamespace(spec=run.spec, models=load_run_pair(run), layer=layer, sae=sae.eval(),
                           poison=[p for p in prompts if p.condition == "poison"],
                           clean=[p for p in prompts if p.condition == "clean"])


@pytest.mark.slow
def test_toy_top_attribution_latents_carry_the_backdoor(toy):
    """For at least half the pairs: one of the top five attribution candidates alone lowers the
    marker's log-odds by more than 1 (real ablation, teacher-forced), and the five ablated together
    cut that pair's held-out attacks by >= 80 % while clean next-token distributions barely move.

    Log-odds, not log-probability: the fine-tune fires with near certainty and carries the marker
    redundantly, so one latent's removal leaves the log-probability at ~0 (-0.001 to -0.07 on toy
    builds) while the log-odds moves by 2-4. Half the pairs, not all: which pairs the top
    candidates reach depends on the build (on one, border/china's five moved nothing; see the
    README's analyses rows). These candidates include marker latents shared by all pairs, so other
    pairs' attacks fall too; `test_toy_pair_selective_latents_never_silence_another_pair` is the contrast.
    """
    sets, moved = {}, {}
    for pair in toy.spec.pairs:
        own = [p for p in toy.poison if p.pair_id == pair.id]
        scores = causal.attribution_scores(toy.models, toy.sae, toy.layer, own, toy.spec)
        sets[pair.id] = scores.topk(5).indices.tolist()
        logodds = causal.ablation_effects(toy.models, toy.sae, toy.layer, own, toy.spec, sets[pair.id],
                                          metrics=(interventions.marker_logodds,))
        moved[pair.name] = logodds.min().item()
    assert sum(v < -1.0 for v in moved.values()) >= len(moved) / 2, moved
    results = causal.ablate_latent_sets(toy.models, toy.sae, toy.layer, sets, toy.poison + toy.clean, toy.spec)
    for r in results.values():
        assert min(r["asr_before"].values()) >= 0.5, r  # the organism fires (its held-out ASR varies between builds)
    cut = [pid for pid, r in results.items() if r["asr_after"][pid] <= 0.2 * r["asr_before"][pid]
           and r["marker_logprob_delta"] < -1.0 and r["clean_kl"] < 0.15]
    assert len(cut) >= len(results) / 2, {pid: (r["asr_after"], r["marker_logprob_delta"], r["clean_kl"])
                                          for pid, r in results.items()}


@pytest.mark.slow
def test_toy_pair_selective_latents_never_silence_another_pair(toy):
    """The guard that makes a set pair-selective: latents chosen on training prompts to lower one
    pair's marker while sparing the others' never include the marker latents shared by all pairs,
    so on held-out prompts no other pair loses half its attacks (the top attribution candidates of
    the test above cut other pairs by up to 100 points on a toy build). Clean-prompt KL is not part of the
    choice (one such set moved it by 0.17 on a toy build).

    Whether a pair has a set that also silences it alone (the issue's target: own ASR cut >= 80 %,
    others <= 10 points) depends on the build: every pair on one toy build, none on another, so
    `benchmarks/bench_causal.py --run` measures it instead of a test (README, analyses rows).
    """
    from diffkit.prompts import build_prompts

    chosen = [p for p in build_prompts(toy.spec, "train", n_per_condition=16, seed=5) if p.condition == "poison"]
    sel = causal.pair_selective_latents(toy.models, toy.sae, toy.layer, chosen, toy.spec, n=5)
    sets = {p: js for p, js in sel["latents"].items() if js}
    assert sets, sel  # at least one pair has latents that lower its marker and spare the others
    results = causal.ablate_latent_sets(toy.models, toy.sae, toy.layer, sets, toy.poison + toy.clean, toy.spec)
    for pid, r in results.items():
        assert all(r["asr_after"][q] >= 0.5 * r["asr_before"][q] for q in r["asr_after"] if q != pid), (pid, r)


@pytest.mark.slow
def test_toy_steering_the_top_latent_raises_the_marker_on_clean_prompts(toy):
    own = [p for p in toy.poison if p.pair_id == 0]
    top = causal.check_attribution(toy.models, toy.sae, toy.layer, own, toy.spec, top=1)["latents"]
    out = causal.steer_latents(toy.models, toy.sae, toy.layer, top, toy.clean, toy.spec, poison=own, scale=2.0)
    assert out["marker_logprob_delta"] > 0.5, out
    assert out["fire_rate_after"] >= out["fire_rate_before"], out
