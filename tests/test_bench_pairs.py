"""The GPU benchmark's arithmetic, checked on CPU: the Gemma-2-2B-shaped pair has Gemma-2-2B's shapes,
and its FLOP count per token (the numerator of MFU) is the published ≈3.7-3.9 GFLOP per model to layer 24."""

import torch
from transformers import Gemma2ForCausalLM

from benchmarks.pairs import forward_flops_per_token, gemma2_2b_config


def test_gemma2_2b_shape_and_flops_per_token(toy_organism):
    config, tokenizer = gemma2_2b_config()
    with torch.device("meta"):  # shapes only: no 10 GB of weights
        model = Gemma2ForCausalLM(config)
    assert (config.num_hidden_layers, config.hidden_size) == (26, 2304)
    assert 2.55e9 < sum(p.numel() for p in model.parameters()) < 2.65e9  # Gemma-2-2B: 2.61B parameters
    per_layer = 2 * (2304 * 256 * (8 + 4 + 4) + 8 * 256 * 2304 + 3 * 2304 * 9216)  # q, k, v, o, gate/up/down
    assert forward_flops_per_token(model, 24) == 25 * per_layer
    assert 3.6e9 < forward_flops_per_token(model, 24) < 4.0e9
    assert tokenizer.pad_token_id == config.pad_token_id
