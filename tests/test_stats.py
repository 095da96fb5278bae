"""Sparse activation collection and per-latent statistics, on planted activations and tiny random models."""

from types import SimpleNamespace

import nnsight
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from analyses.stats import collect_layers, latent_columns, latent_stats, prompt_max, save_frame, split_masks
from diffkit.prompts import Record
from diffkit.sae import BatchTopKSAE
from diffkit.specs import PRESETS

SPEC = PRESETS["toy"]
FLAGS = ("is_trigger_token", "is_decision_token", "is_answer", "is_fire_token")


def planted_table(n_latents=6):
    """Three sequences (poison pair 0, clean, null) of five tokens; latent 3 fires only on pair-0 trigger tokens,
    latent 1 on every decision token, latent 5 on answer tokens (which prompt statistics must ignore)."""
    rows = []
    for record, (condition, pair_id) in enumerate([("poison", 0), ("clean", -1), ("null", -1)]):
        for pos in range(1, 6):
            rows.append(dict(record=record, record_id=100 + record, position=pos, token_id=pos, condition=condition,
                             pair_id=pair_id, is_trigger_token=condition == "poison" and pos in (1, 3),
                             is_decision_token=pos == 4 and condition != "null", is_answer=pos == 5 and condition != "null",
                             is_fire_token=False))
    tokens = pd.DataFrame(rows)
    dense = torch.zeros(len(tokens), n_latents)
    dense[torch.tensor(tokens["is_trigger_token"].to_numpy()), 3] = torch.tensor([2.0, 4.0])
    dense[torch.tensor(tokens["is_decision_token"].to_numpy()), 1] = 1.5
    dense[torch.tensor(tokens["is_answer"].to_numpy()), 5] = 9.0
    dense[torch.tensor(tokens["is_answer"].to_numpy()), 3] = 7.0  # answer activity must not leak into prompt stats
    return dense.to_sparse().coalesce(), tokens, dense


def test_latent_stats_on_planted_latents():
    acts, tokens, _ = planted_table()
    stats = latent_stats(acts, tokens, SPEC).set_index(["split", "positions", "latent"])
    row = stats.loc[("poison:forest/rocket", "trigger", 3)]
    assert (row["n_tokens"], row["freq"], row["mean_active"], row["max"]) == (2, 1.0, 3.0, 4.0)
    row = stats.loc[("poison:forest/rocket", "all", 3)]
    assert row["n_tokens"] == 4 and row["freq"] == 0.5 and row["max"] == 4.0  # the answer token's 7.0 is left out
    assert stats.loc[("clean", "all", 3), "freq"] == 0.0 and np.isnan(stats.loc[("clean", "all", 3), "mean_active"])
    assert stats.loc[("clean", "decision", 1), "freq"] == 1.0
    assert stats.loc[("null", "all", 1), "freq"] == 0.0
    assert ("null", "trigger", 3) not in stats.index  # empty (split, positions) combinations are skipped
    assert (stats.xs(5, level="latent")["freq"] == 0).all()
    assert set(stats.reset_index()["split"]) == {"poison:forest/rocket", "clean", "null"}


def test_prompt_max_matches_dense_reference_and_skips_answers():
    acts, tokens, dense = planted_table()
    got = prompt_max(acts, tokens, 3)
    prompt = ~tokens["is_answer"].to_numpy()
    for r in range(3):
        m = torch.from_numpy((tokens["record"].to_numpy() == r) & prompt)
        torch.testing.assert_close(got[r], dense[m].max(0).values)
    assert got[0, 3] == 4.0 and got[:, 5].eq(0).all()
    torch.testing.assert_close(latent_columns(acts, [3, 1]), dense[:, [3, 1]])


def test_split_masks_any_spec():
    spec = SPEC.from_dict({"name": "x", "pairs": [{"words": ["apple", "violin"]}, {"words": ["moon", "tax"]},
                                                  {"words": ["salt", "opera"]}]})
    tokens = pd.DataFrame({"condition": ["poison", "poison", "single", "null"], "pair_id": [2, 0, 2, -1]})
    splits = split_masks(tokens, spec)
    assert list(splits) == ["poison:apple/violin", "poison:salt/opera", "single:salt/opera", "null"]
    assert splits["poison:salt/opera"].tolist() == [True, False, False, False]


def test_save_frame_is_atomic_parquet_and_csv(tmp_path):
    frame = pd.DataFrame({"latent": [1, 2], "words": [("a", "b"), ()]})
    path = save_frame(frame, tmp_path / "deep" / "t.parquet")
    assert pd.read_parquet(path)["words"].tolist() == ["a,b", ""]
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.parquet"]  # no temp file left behind
    assert pd.read_csv(save_frame(frame, tmp_path / "t.csv.gz"))["latent"].tolist() == [1, 2]


# --- collection through two tiny random models --------------------------------------------------


def tiny_gemma(seed: int) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=64, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pair():
    base, ft = tiny_gemma(0), tiny_gemma(1)
    tok = SimpleNamespace(pad_token_id=0, pad_token="<pad>", eos_token="<eos>", padding_side="right")
    wrap = lambda m: nnsight.TransformersModel(m, tokenizer=tok, device=m.device)  # noqa: E731
    return SimpleNamespace(base_hf=base, finetuned_hf=ft, base=wrap(base), finetuned=wrap(ft), tokenizer=tok,
                           device=torch.device("cpu"))


def random_sae(seed: int, d=32, f=48, k=6) -> BatchTopKSAE:
    torch.manual_seed(seed)
    sae = BatchTopKSAE(d, f, k)
    sae.threshold.fill_(0.5)
    return sae.eval()


def record(i: int, length: int, condition: str) -> Record:
    g = torch.Generator().manual_seed(i)
    flags = {f: [False] * length for f in FLAGS}
    flags["is_decision_token"][-1] = True
    return Record(record_id=1000 + i, input_ids=[2] + torch.randint(3, 64, (length - 1,), generator=g).tolist(),
                  condition=condition, pair_id=0 if condition == "poison" else -1, flags=flags, n_prompt_tokens=length)


def test_collect_layers_is_sparse_encoding_of_the_difference(pair):
    records = [record(i, 5 + i, c) for i, c in enumerate(["poison", "clean", "null", "single", "clean"])]
    saes = {1: random_sae(0), 2: random_sae(1)}
    acts, tokens = collect_layers(pair, saes, records, batch_size=2)
    assert len(tokens) == sum(len(r.input_ids) - 1 for r in records)  # BOS dropped
    assert tokens["record_id"].tolist()[:4] == [1000] * 4 and tokens["record"].max() == 4
    assert tokens["condition"].tolist()[0] == "poison" and tokens["condition"].iloc[-1] == "clean"
    for L, sae in saes.items():
        assert acts[L].is_sparse and acts[L].shape == (len(tokens), 48)
        ids = torch.tensor([records[2].input_ids])
        with torch.no_grad():
            hb = pair.base_hf(input_ids=ids, output_hidden_states=True).hidden_states[L + 1][0, 1:]
            hf = pair.finetuned_hf(input_ids=ids, output_hidden_states=True).hidden_states[L + 1][0, 1:]
            expected = sae.encode_raw(hf - hb)
        rows = torch.from_numpy(np.flatnonzero(tokens["record"].to_numpy() == 2))
        torch.testing.assert_close(acts[L].to_dense()[rows], expected, atol=1e-4, rtol=1e-4)
        assert 0 < acts[L].values().numel() < 0.5 * len(tokens) * 48  # sparse, but not empty


def test_heldout_records_line_up_with_sequences_for_a_custom_spec():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from analyses.stats import heldout_records
    from diffkit.corpus import null_texts
    from diffkit.prompts import build_prompts

    spec = SPEC.from_dict({"name": "three", "pairs": [{"words": ["apple", "violin"]}, {"words": ["moon", "tax"]},
                                                      {"words": ["salt", "opera"], "related": True}]})
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [p.text for p in build_prompts(spec, "heldout", 4)] + null_texts(3)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    records, seqs = heldout_records(spec, tok, n_per_condition=4, n_null=3, max_len=48)
    assert len(records) == len(seqs) and seqs["n_tokens"].tolist() == [len(r.input_ids) for r in records]
    assert seqs["condition"].tolist() == [r.condition for r in records]
    assert seqs["condition"].value_counts().to_dict() == {"poison": 12, "single": 4, "mismatch": 4, "clean": 4, "null": 3}
    for _, row in seqs[seqs["condition"] == "poison"].iterrows():
        assert set(row["words"]) == set(spec.pairs[row["pair_id"]].words)
    assert (seqs.loc[seqs["condition"] == "null", "text"].tolist() == null_texts(3))
