"""The pre-LN GPT transformer with tensor-parallel linear layers (Megatron-LM semantics).

    x = x + dropout(attention(LN(x)))
    x = x + dropout(mlp(LN(x)))

Activations are [seq, batch, hidden]. Attention and MLP each enter the TP region through a
ColumnParallelLinear (every rank computes its own heads / its slice of the 4h features) and leave
it through a RowParallelLinear (partial sums reduced over TP). With sequence parallelism the
layer norms and dropouts outside those regions run on [s/tp, b, h] shards: column layers
all-gather the sequence on the way in, row layers reduce-scatter it on the way out.

Initialisation is layout-independent: each weight is drawn in full from its own generator seeded
by (seed, the parameter's global name), then each TP rank keeps its shard, so TP=1/2/4 and every
pipeline split start from the same model.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.kernels.fused_softmax import FusedScaleMaskSoftmax, causal_mask
from megatron_lite.model.rotary import apply_rotary_pos_emb
from megatron_lite.parallel.layers import ColumnParallelLinear, RowParallelLinear, init_method_normal
from megatron_lite.parallel.params import mark_sequence_parallel
from megatron_lite.parallel.random import checkpoint, get_rng_tracker
from megatron_lite.parallel.state import ParallelState, require_state
from megatron_lite.parallel.utils import divide

ATTENTION_BACKENDS = ("unfused", "fused_softmax", "sdpa")


# ---- initialisation -------------------------------------------------------------------------

def param_seed(seed: int, name: str) -> int:
    """A 32-bit seed for one parameter from the run seed and its global name."""
    return zlib.crc32(f"{seed}/{name}".encode())


def seeded_init(seed: int, name: str, std: float):
    """init_method filling a full weight with N(0, std) drawn from the parameter's own generator."""
    return init_method_normal(std, seed=param_seed(seed, name))


def output_init_std(config: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


# ---- LayerNorm: apex's fused kernel when it is importable and the model is on CUDA ------------

def _apex_fused_layer_norm():
    """apex.normalization.FusedLayerNorm, or None where apex (with its CUDA extension) does not import.

    Imported here, never at module top: CPU runs must not import apex. A Python-only apex build has
    no ``fused_layer_norm_cuda`` and would fail at the first forward, so it counts as absent.
    """
    try:
        from apex.normalization import FusedLayerNorm
        importlib.import_module("fused_layer_norm_cuda")  # imported only to probe that it loads
    except Exception:  # ImportError, or a broken build failing while it loads
        return None
    return FusedLayerNorm


def layernorm_class(device) -> type:
    """The LayerNorm class for a model on ``device``: apex's FusedLayerNorm (what Megatron-LM uses) when
    the device is CUDA and apex imports, otherwise torch.nn.LayerNorm. apex is used, never required."""
    if device is not None and torch.device(device).type == "cuda":
        fused = _apex_fused_layer_norm()
        if fused is not None:
            return fused
    return nn.LayerNorm


def make_layernorm(hidden: int, eps: float, device, dtype, cls: Optional[type] = None) -> nn.Module:
    """A LayerNorm over ``hidden`` with parameters ``weight`` (ones) and ``bias`` (zeros) on device/dtype.

    ``cls`` defaults to ``layernorm_class(device)``. apex's constructor takes no device or dtype, so its
    parameters are made on the CPU in fp32 and then moved; both classes compute the same function.
    """
    cls = layernorm_class(device) if cls is None else cls
    if cls is nn.LayerNorm:
        return nn.LayerNorm(hidden, eps=eps, device=device, dtype=dtype)
    return cls(hidden, eps=eps).to(device=device, dtype=dtype)


def layer_norm(config: ModelConfig, sequence_parallel: bool, device) -> nn.Module:
    ln = make_layernorm(config.hidden_size, config.layernorm_epsilon, device, config.params_dtype)
    if sequence_parallel:
        # Each TP rank normalises only its sequence chunk, so its weight/bias grads are partial:
        # the trainer all-reduces grads of params carrying this flag over the TP group.
        for p in ln.parameters():
            mark_sequence_parallel(p)
    return ln


# ---- attention backends -------------------------------------------------------------------

def resolve_attention_backend(config: ModelConfig) -> str:
    """Pick the core-attention implementation once, at model build.

    'auto' -> 'sdpa' (torch's scaled_dot_product_attention: the fastest here on CPU and GPU)
    when this torch has it, else 'unfused'. Whether 'fused_softmax' actually runs the Triton
    kernel (CUDA, triton importable, shapes that fit) is FusedScaleMaskSoftmax's decision.
    """
    choice = config.attention_backend
    if choice == "auto":
        return "sdpa" if hasattr(F, "scaled_dot_product_attention") else "unfused"
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of auto, {', '.join(ATTENTION_BACKENDS)}; "
                         f"got {choice!r}")
    return choice


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v for this rank's heads.

    forward(q, k, v [s, b, np, hn], attention_mask None | bool [b|1, 1, s, s] True=masked)
      -> context [s, b, np * hn]. No parameters: safe to recompute (selective recompute).
    """

    def __init__(self, config: ModelConfig, backend: str, sequence_parallel: bool):
        super().__init__()
        self.backend = backend
        self.norm_factor = math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout
        # With sequence parallelism the whole transformer block already runs on the tracker's
        # stream (Megatron does the same), so forking again here would replay its numbers.
        self.fork_for_dropout = not sequence_parallel
        if backend in ("unfused", "fused_softmax"):
            self.scale_mask_softmax = FusedScaleMaskSoftmax(
                causal=True, scale=None,
                masked_softmax_fusion=backend == "fused_softmax" and config.masked_softmax_fusion,
                softmax_in_fp32=config.attention_softmax_in_fp32)

    def _rng(self):
        # Heads are split over TP ranks: each rank's probabilities need their own dropout mask.
        return get_rng_tracker().fork() if self.fork_for_dropout else contextlib.nullcontext()

    def forward(self, q, k, v, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sq, b, np_, hn = q.shape
        sk = k.size(0)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.backend == "sdpa":
            qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, np, s, hn]
            mask = None
            # One new query (cached decoding) may see every key: no mask to build.
            causal = not (sq == 1 and attention_mask is None)
            if causal and (attention_mask is not None or sq != sk):
                # sdpa's bool mask is True where attention is ALLOWED; causal is folded in.
                masked = causal_mask(sq, sk, q.device)
                if attention_mask is not None:
                    masked = masked | attention_mask
                mask = ~masked
            with self._rng() if dropout_p > 0 else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                                     is_causal=causal and mask is None)
            return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

        # Unfused: [b*np, sq, hn] x [b*np, hn, sk] -> scores, scaled in the matmul as Megatron does.
        q2 = q.reshape(sq, b * np_, hn).transpose(0, 1)
        k2 = k.reshape(sk, b * np_, hn).transpose(0, 1)
        scores = torch.baddbmm(torch.empty(b * np_, sq, sk, dtype=q.dtype, device=q.device),
                               q2, k2.transpose(1, 2), beta=0.0, alpha=1.0 / self.norm_factor)
        probs = self.scale_mask_softmax(scores.view(b, np_, sq, sk), attention_mask)
        if dropout_p > 0:
            with self._rng():
                probs = F.dropout(probs, dropout_p, training=True)
        v2 = v.reshape(sk, b * np_, hn).transpose(0, 1)
        context = torch.bmm(probs.view(b * np_, sq, sk), v2)  # [b*np, sq, hn]
        return context.view(b, np_, sq, hn).permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class ParallelAttention(nn.Module):
    """Causal self-attention; this TP rank holds num_heads / tp complete heads.

    The fused QKV projection's output features are laid out [num_heads, 3, head_dim], so the
    contiguous shard ColumnParallelLinear gives each rank is whole heads (q, k and v of each).
    """

    def __init__(self, config: ModelConfig, prefix: str, seed: int, backend: str,
                 sequence_parallel: bool, pstate: ParallelState):
        super().__init__()
        self.pstate = pstate
        self.head_dim = config.kv_channels
        self.heads_per_partition = divide(config.num_attention_heads, pstate.tp_size)
        projection = config.kv_channels * config.num_attention_heads
        common = dict(sequence_parallel=sequence_parallel, params_dtype=config.params_dtype, pstate=pstate)
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size, 3 * projection, bias=True, gather_output=False,
            init_method=seeded_init(seed, f"{prefix}.query_key_value.weight", config.init_method_std),
            **common)
        self.core_attention = CoreAttention(config, backend, sequence_parallel)
        self.dense = RowParallelLinear(
            projection, config.hidden_size, bias=True, input_is_parallel=True,
            init_method=seeded_init(seed, f"{prefix}.dense.weight", output_init_std(config)), **common)
        self.recompute_core_attention = config.recompute_granularity == "selective"
        self.layer_number = int(prefix.split(".")[2])  # decoder.layers.<global index>.self_attention

    def forward(self, x, attention_mask=None, rotary_pos_emb=None, kv_cache=None) -> torch.Tensor:
        """``kv_cache`` (inference/kv_cache.py): ``x`` holds only the new positions; their keys and
        values join the cached ones and the queries attend to all of them (causal, bottom-right)."""
        mixed, _ = self.query_key_value(x)  # [s, b, np * 3 * hn]
        s, b = mixed.shape[:2]
        mixed = mixed.view(s, b, self.heads_per_partition, 3 * self.head_dim)
        q, k, v = torch.split(mixed, self.head_dim, dim=-1)
        if rotary_pos_emb is not None:
            q = apply_rotary_pos_emb(q, rotary_pos_emb)
            k = apply_rotary_pos_emb(k, rotary_pos_emb)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)
        if self.recompute_core_attention and torch.is_grad_enabled():
            # Selective recompute: the s^2 scores/probs are the big activations, and cheap to redo.
            context = checkpoint(self.core_attention, False, q, k, v, attention_mask, pstate=self.pstate)
        else:
            context = self.core_attention(q, k, v, attention_mask)
        out, _ = self.dense(context)
        return out


class ParallelMLP(nn.Module):
    """h -> ffn_hidden_size (split over TP) -> GeLU -> h (partial sums reduced over TP)."""

    def __init__(self, config: ModelConfig, prefix: str, seed: int, sequence_parallel: bool,
                 pstate: ParallelState):
        super().__init__()
        common = dict(sequence_parallel=sequence_parallel, params_dtype=config.params_dtype, pstate=pstate)
        # exact erf GeLU is Megatron's default; --openai-gelu is GPT-2's tanh approximation
        self.gelu_approximate = "tanh" if getattr(config, "openai_gelu", False) else "none"
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, bias=True, gather_output=False,
            init_method=seeded_init(seed, f"{prefix}.dense_h_to_4h.weight", config.init_method_std),
            **common)
        self.dense_4h_to_h = RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, bias=True, input_is_parallel=True,
            init_method=seeded_init(seed, f"{prefix}.dense_4h_to_h.weight", output_init_std(config)),
            **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.dense_h_to_4h(x)
        out, _ = self.dense_4h_to_h(F.gelu(h, approximate=self.gelu_approximate))
        return out


class TransformerLayer(nn.Module):
    """One pre-LN block. ``prefix`` is its GLOBAL name (decoder.layers.<global index>), used for seeding."""

    def __init__(self, config: ModelConfig, prefix: str, seed: int, backend: str,
                 sequence_parallel: bool, pstate: ParallelState):
        super().__init__()
        device = pstate.device
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = layer_norm(config, sequence_parallel, device)
        self.self_attention = ParallelAttention(config, f"{prefix}.self_attention", seed, backend,
                                                sequence_parallel, pstate)
        self.post_attention_layernorm = layer_norm(config, sequence_parallel, device)
        self.mlp = ParallelMLP(config, f"{prefix}.mlp", seed, sequence_parallel, pstate)

    def forward(self, x, attention_mask=None, rotary_pos_emb=None, kv_cache=None) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x), attention_mask, rotary_pos_emb, kv_cache)
        x = x + F.dropout(attn, self.hidden_dropout, training=self.training)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(mlp, self.hidden_dropout, training=self.training)


class TransformerBlock(nn.Module):
    """This pipeline stage's layers (global indices layer_offset .. layer_offset + num_layers - 1),
    with activation recompute, plus the final LayerNorm on the last stage.

    --recompute-granularity full --recompute-method uniform: checkpoint chunks of
        --recompute-num-layers consecutive layers (only chunk inputs are kept);
    --recompute-granularity full --recompute-method block: checkpoint each of the first
        --recompute-num-layers layers of this stage, run the rest normally;
    --recompute-granularity selective: checkpoint core attention only (inside ParallelAttention).
    """

    def __init__(self, config: ModelConfig, layer_offset: int, num_layers: int, seed: int, backend: str,
                 post_process: bool, pstate: Optional[ParallelState] = None):
        super().__init__()
        self.pstate = require_state(pstate)
        self.sequence_parallel = config.sequence_parallel and self.pstate.tp_size > 1
        self.layers = nn.ModuleList([
            TransformerLayer(config, f"decoder.layers.{layer_offset + i}", seed, backend,
                             self.sequence_parallel, self.pstate)
            for i in range(num_layers)])
        self.final_layernorm = (layer_norm(config, self.sequence_parallel, self.pstate.device)
                                if post_process else None)
        self.recompute_granularity = config.recompute_granularity
        self.recompute_method = config.recompute_method
        self.recompute_num_layers = config.recompute_num_layers or 1
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            raise ValueError("--recompute-granularity full needs --recompute-method uniform|block")
        self.has_dropout = config.hidden_dropout > 0 or config.attention_dropout > 0

    def _run_layers(self, start: int, end: int, kv_cache=None):
        def run(hidden, attention_mask, rotary_pos_emb):
            for layer in self.layers[start:end]:
                hidden = layer(hidden, attention_mask, rotary_pos_emb, kv_cache)
            return hidden
        return run

    def _checkpointed(self, start, end, hidden, attention_mask, rotary_pos_emb):
        return checkpoint(self._run_layers(start, end), False, hidden, attention_mask, rotary_pos_emb,
                          pstate=self.pstate)

    def forward(self, hidden, attention_mask=None, rotary_pos_emb=None, kv_cache=None) -> torch.Tensor:
        n = len(self.layers)
        if kv_cache is not None:  # incremental decoding: no grad, so no recompute and no dropout
            hidden = self._run_layers(0, n, kv_cache)(hidden, attention_mask, rotary_pos_emb)
            return hidden if self.final_layernorm is None else self.final_layernorm(hidden)
        # Sequence-parallel activations differ between TP ranks, so their dropout masks must too:
        # the whole stack then draws from the tracker's model-parallel stream (as Megatron does).
        fork = self.sequence_parallel and self.training and self.has_dropout
        with get_rng_tracker().fork() if fork else contextlib.nullcontext():
            if self.recompute_granularity == "full" and torch.is_grad_enabled():
                if self.recompute_method == "uniform":
                    for start in range(0, n, self.recompute_num_layers):
                        end = min(start + self.recompute_num_layers, n)
                        hidden = self._checkpointed(start, end, hidden, attention_mask, rotary_pos_emb)
                else:  # block
                    for i in range(n):
                        if i < self.recompute_num_layers:
                            hidden = self._checkpointed(i, i + 1, hidden, attention_mask, rotary_pos_emb)
                        else:
                            hidden = self.layers[i](hidden, attention_mask, rotary_pos_emb)
            else:
                hidden = self._run_layers(0, n)(hidden, attention_mask, rotary_pos_emb)
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden
