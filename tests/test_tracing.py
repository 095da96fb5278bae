"""Paired tracing and the shuffle buffer, on two tiny random Gemma-2 models."""

from types import SimpleNamespace

import nnsight
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from diffkit.buffer import ShuffleBuffer
from diffkit.prompts import Record
from diffkit.tracing import CONDITION_CODES, TokenBatch, trace_batch, trace_differences, trace_layer_outputs, traced_tokens

FLAGS = ("is_trigger_token", "is_decision_token", "is_answer", "is_fire_token")


def tiny_gemma(seed: int) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=64, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, 64)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def pair():
    base, ft = tiny_gemma(0), tiny_gemma(1)
    tok = tiny_tokenizer()
    wrap = lambda m: nnsight.TransformersModel(m, tokenizer=tok, device=m.device)  # noqa: E731
    return SimpleNamespace(base_hf=base, finetuned_hf=ft, base=wrap(base), finetuned=wrap(ft), tokenizer=tok, n_layers=4, d_model=32,
                           device=torch.device("cpu"))


def record(rid: int, length: int, condition="clean") -> Record:
    g = torch.Generator().manual_seed(rid)
    ids = [2] + torch.randint(3, 64, (length - 1,), generator=g).tolist()
    flags = {f: [False] * length for f in FLAGS}
    flags["is_decision_token"][-1] = True
    return Record(record_id=rid, input_ids=ids, condition=condition, pair_id=-1, flags=flags, n_prompt_tokens=length)


def test_traced_layers_match_hidden_states(pair):
    ids = torch.tensor([record(0, 9).input_ids])
    mask = torch.ones_like(ids)
    outs = trace_layer_outputs(pair.base, ids, mask, [2, 1])
    hidden = pair.base_hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(outs[0], hidden[3])
    torch.testing.assert_close(outs[1], hidden[2])


def test_difference_drops_padding_and_bos_and_ignores_batch_mates(pair):
    recs = [record(1, 5, "poison"), record(2, 12), record(3, 8, "null")]
    batch = trace_batch(pair, recs, [1, 3])
    assert len(batch) == sum(len(r.input_ids) - 1 for r in recs) == traced_tokens(recs)
    assert batch.diffs[1].dtype == torch.float32 and batch.diffs[3].shape == (len(batch), 32)
    assert 0 not in batch.meta["position"].tolist()  # BOS gone
    assert batch.meta["condition"][0] == CONDITION_CODES["poison"]
    # the short record traced alone gives the same differences as inside a padded batch
    alone = trace_batch(pair, recs[:1], [1, 3])
    torch.testing.assert_close(alone.diffs[3], batch.diffs[3][: len(alone)], atol=1e-5, rtol=1e-4)
    # and they really are ft − base at those tokens
    ids = torch.tensor([recs[0].input_ids])
    # (hidden_states[L + 1] is layer L's output, except the last entry, which is after the final norm)
    hb = pair.base_hf(input_ids=ids, output_hidden_states=True).hidden_states[2][0, 1:]
    hf = pair.finetuned_hf(input_ids=ids, output_hidden_states=True).hidden_states[2][0, 1:]
    torch.testing.assert_close(alone.diffs[1], hf - hb, atol=1e-5, rtol=1e-4)
    assert batch.meta["is_decision_token"].sum() == 3


def test_trace_differences_covers_all_records(pair):
    recs = [record(i, 4 + i % 5) for i in range(7)]
    batches = list(trace_differences(pair, recs, [2], batch_size=3))
    assert len(batches) == 3
    assert sorted(set(torch.cat([b.meta["record_id"] for b in batches]).tolist())) == list(range(7))


def fake_batch(start: int, n: int) -> TokenBatch:
    ids = torch.arange(start, start + n)
    return TokenBatch({5: ids.float()[:, None].repeat(1, 4)}, {"record_id": ids // 10, "position": ids})


def test_buffer_mixes_and_is_deterministic():
    def run(seed):
        buf = ShuffleBuffer(capacity=100, batch_size=16, seed=seed)
        for s in range(0, 120, 20):
            buf.add(fake_batch(s, 20))
        assert not buf.needs_more(tokens_left=1000)  # full: it holds its capacity
        return [b.meta["position"] for b, _ in buf.drain()]

    out = run(0)
    assert len(out) == 120 // 16  # whole batches only
    seen = torch.cat(out)
    assert len(set(seen.tolist())) == len(seen)  # no token twice
    first = out[0]
    assert len(set((first // 10).tolist())) >= 5  # one batch mixes many records
    assert all(torch.equal(a, b) for a, b in zip(out, run(0)))
    assert not all(torch.equal(a, b) for a, b in zip(out, run(1)))
    # it asks for no more than the whole batches a run still trains on
    buf = ShuffleBuffer(capacity=100, batch_size=16)
    buf.add(fake_batch(0, 40))
    assert buf.needs_more(tokens_left=1000) and buf.needs_more(tokens_left=33)  # 33 tokens train as 3 batches: 48
    assert not buf.needs_more(tokens_left=32) and not buf.needs_more(tokens_left=17)  # 2 batches: 32 <= 40 held
    # the activation rows travel with their metadata
    buf = ShuffleBuffer(capacity=10, batch_size=5)
    buf.add(fake_batch(0, 10))
    for b, _ in buf.drain():
        assert torch.equal(b.diffs[5][:, 0].long(), b.meta["position"])


def test_buffer_rejects_capacity_below_batch():
    with pytest.raises(ValueError, match="capacity"):
        ShuffleBuffer(capacity=8, batch_size=16)
