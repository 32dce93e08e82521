"""LayerNorm selection: apex's FusedLayerNorm when apex imports and the model is on CUDA, torch's otherwise.

No CUDA and no real apex are needed: a fake ``apex.normalization`` (built like apex's: constructor without
device/dtype, fp32 CPU parameters) is put into sys.modules, "cuda" is passed only to the selection
function, and the fake is built on the CPU through ``make_layernorm(..., cls=...)``.
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model import GPTModel
from megatron_lite.model import transformer
from megatron_lite.model.transformer import layer_norm, layernorm_class, make_layernorm
from megatron_lite.parallel.state import ParallelState


class FakeFusedLayerNorm(nn.Module):
    """Stands in for apex.normalization.FusedLayerNorm (same constructor, parameter names and math)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(*self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(*self.normalized_shape))

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@pytest.fixture
def fake_apex(monkeypatch):
    """An importable apex with its CUDA extension; counts how often FusedLayerNorm is looked up."""
    lookups = []

    def getattr_(name):
        if name == "FusedLayerNorm":
            lookups.append(name)
            return FakeFusedLayerNorm
        raise AttributeError(name)

    normalization = types.ModuleType("apex.normalization")
    normalization.__getattr__ = getattr_
    apex = types.ModuleType("apex")
    apex.normalization = normalization
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
    return lookups


def test_cpu_uses_torch_layernorm_without_touching_apex(fake_apex):
    for device in ("cpu", torch.device("cpu"), None):
        assert layernorm_class(device) is nn.LayerNorm
    ln = make_layernorm(48, 1e-6, "cpu", torch.float64)
    assert type(ln) is nn.LayerNorm and ln.eps == 1e-6 and ln.normalized_shape == (48,)
    assert ln.weight.dtype == torch.float64 and torch.equal(ln.weight, torch.ones(48, dtype=torch.float64))
    assert fake_apex == []  # apex importable, yet a CPU model never looked it up


def test_cuda_selects_apex_when_importable(fake_apex):
    assert layernorm_class("cuda") is FakeFusedLayerNorm
    assert layernorm_class(torch.device("cuda", 1)) is FakeFusedLayerNorm
    assert fake_apex  # looked up through `from apex.normalization import FusedLayerNorm`


def test_cuda_falls_back_when_apex_is_absent_or_python_only(monkeypatch, fake_apex):
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)  # apex built without --cuda_ext
    assert layernorm_class("cuda") is nn.LayerNorm
    monkeypatch.setitem(sys.modules, "apex.normalization", None)  # no apex at all
    assert layernorm_class("cuda") is nn.LayerNorm


def test_apex_layernorm_is_built_on_device_and_dtype_and_computes_layernorm():
    x = torch.randn(5, 2, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ln = make_layernorm(48, 1e-6, "cpu", torch.float64, cls=FakeFusedLayerNorm)
    assert type(ln) is FakeFusedLayerNorm and ln.eps == 1e-6
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in ln.parameters())
    ref = nn.LayerNorm(48, eps=1e-6, dtype=torch.float64)
    torch.testing.assert_close(ln(x), ref(x), rtol=1e-12, atol=1e-12)


def test_model_layernorms_follow_the_selection(monkeypatch):
    """With the selection forced to the fake apex class: every LayerNorm of the model is one, the
    sequence-parallel marking and the parameter names are unchanged, and the model computes the same."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64,
                      padded_vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0)
    ln = layer_norm(cfg, True, "cpu")
    assert type(ln) is nn.LayerNorm and all(p.sequence_parallel for p in ln.parameters())
    plain = GPTModel(cfg, ParallelState(), seed=3)
    monkeypatch.setattr(transformer, "layernorm_class", lambda device: FakeFusedLayerNorm)
    ln = layer_norm(cfg, True, "cpu")
    assert type(ln) is FakeFusedLayerNorm and all(p.sequence_parallel for p in ln.parameters())
    assert not any(hasattr(p, "sequence_parallel") for p in layer_norm(cfg, False, "cpu").parameters())
    fused = GPTModel(cfg, ParallelState(), seed=3)
    norms = [m for m in fused.modules() if isinstance(m, (nn.LayerNorm, FakeFusedLayerNorm))]
    assert len(norms) == 2 * cfg.num_layers + 1 and all(type(m) is FakeFusedLayerNorm for m in norms)
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(ids), plain(ids), rtol=0, atol=0)
