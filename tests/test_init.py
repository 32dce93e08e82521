"""Megatron-LM's initialization rules and vocabulary padding, checked against their definitions."""
import math

import pytest
import torch

from megatron_lite.config import ModelConfig, pad_vocab_size
from megatron_lite.model.gpt import GPTModel
from megatron_lite.parallel.state import ParallelState


@pytest.mark.parametrize("vocab,divisible,tp,expected", [
    (50257, 128, 1, 50304), (50257, 128, 2, 50432), (50257, 128, 8, 51200), (256, 64, 4, 256),
    (257, 64, 4, 512), (1, 1, 1, 1)])
def test_pad_vocab_size_is_megatrons(vocab, divisible, tp, expected):
    assert pad_vocab_size(vocab, divisible, tp) == expected


def test_init_std_and_scaled_output_projections():
    """normal(0, std) everywhere, std / sqrt(2 * num_layers) for the attention and MLP output
    projections, zero biases, LayerNorm weights one."""
    layers, std = 8, 0.02
    cfg = ModelConfig(num_layers=layers, hidden_size=128, num_attention_heads=4, seq_length=16,
                      vocab_size=1024, init_method_std=std, hidden_dropout=0.0, attention_dropout=0.0)
    cfg.padded_vocab_size = 1024
    model = GPTModel(cfg, ParallelState(), seed=5)
    scaled = std / math.sqrt(2 * layers)
    seen_scaled = 0
    for name, p in model.named_parameters():
        if p.dim() == 1:
            want = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            assert torch.all(p == want), name
            continue
        is_output_projection = name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight"))
        target = scaled if is_output_projection else std
        seen_scaled += is_output_projection
        assert abs(p.float().mean().item()) < 3 * target / math.sqrt(p.numel()) + 1e-6, name
        assert p.float().std().item() == pytest.approx(target, rel=0.05), name
    assert seen_scaled == 2 * layers
