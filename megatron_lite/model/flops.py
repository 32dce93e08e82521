"""Analytic FLOPs and parameter counts of the GPT model (for TFLOP/s, MFU and sizing).

FLOPs follow Narayanan et al. (2021), "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", and Megatron-LM's ``num_floating_point_operations`` (a multiply-add
counts 2). For B sequences of s tokens, hidden h, attention projection q = heads x kv_channels,
MLP width f, padded vocabulary V, one layer's forward costs

    QKV 2Bsh(3q) + scores 2Bs^2q + context 2Bs^2q + output projection 2Bsqh + MLP 2(2Bshf)
      = 8Bshq + 4Bs^2q + 4Bshf          (= 24Bsh^2 + 4Bs^2h with q = h, f = 4h)

and the logit layer's 2BshV. The backward pass costs twice the forward, so training costs three
forwards; full activation recompute runs the forward of each recomputed layer once more:

    F = (3L + R)(8Bshq + 4Bs^2q + 4Bshf) + 6BshV          (R = recomputed layers)

With q = h, f = 4h: R = 0 gives 72BsLh^2 (1 + s/6h + V/12Lh) (Megatron-LM's model FLOPs), R = L
gives the paper's 96BsLh^2 (1 + s/6h + V/16Lh). Selective recompute redoes only the softmax and
dropout, whose FLOPs this count leaves out, so it adds nothing here.
"""
from __future__ import annotations

from typing import Optional

from megatron_lite.config import Config, ModelConfig


def _vocab(model_cfg: ModelConfig) -> int:
    vocab = model_cfg.padded_vocab_size or model_cfg.vocab_size
    if vocab is None:
        raise ValueError("ModelConfig needs padded_vocab_size (or vocab_size) to count FLOPs/parameters")
    return vocab


def layer_forward_flops(model_cfg: ModelConfig, batch_size: int) -> float:
    """Forward FLOPs of one transformer layer on ``batch_size`` sequences of seq_length tokens."""
    b, s, h = batch_size, model_cfg.seq_length, model_cfg.hidden_size
    q = model_cfg.kv_channels * model_cfg.num_attention_heads
    f = model_cfg.ffn_hidden_size
    return 8.0 * b * s * h * q + 4.0 * b * s * s * q + 4.0 * b * s * h * f


def _recomputed_in_chunk(model_cfg: ModelConfig, layers: int) -> int:
    """Layers that --recompute-granularity full recomputes in a chunk (pipeline stage) of ``layers``:
    all of them with --recompute-method uniform, the first --recompute-num-layers with block."""
    if model_cfg.recompute_granularity != "full":
        return 0
    if model_cfg.recompute_method == "block":
        return min(model_cfg.recompute_num_layers or 1, layers)
    return layers


def recomputed_layer_count(config: Config) -> int:
    """Layers recomputed across every pipeline stage and model chunk of ``config``'s layout."""
    from megatron_lite.parallel.layout import layers_for_stage

    m, par = config.model, config.parallel
    if m.recompute_method != "block" or m.recompute_granularity != "full":
        return _recomputed_in_chunk(m, m.num_layers)  # no layout dependence: all layers or none
    vp = config.virtual_pipeline_size()
    total = 0
    for pp_rank in range(par.pipeline_model_parallel_size):
        for vp_rank in range(vp or 1):
            _, count = layers_for_stage(m.num_layers, par.pipeline_model_parallel_size, pp_rank,
                                        par.decoder_first_pipeline_num_layers,
                                        par.decoder_last_pipeline_num_layers, vp, vp_rank)
            total += _recomputed_in_chunk(m, count)
    return total


def num_floating_point_operations(model_cfg: ModelConfig, batch_size: int,
                                  recomputed_layers: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward + recompute) of one iteration on ``batch_size`` sequences.

    ``recomputed_layers`` defaults to what ``model_cfg``'s recompute flags give on one pipeline
    stage; pass ``recomputed_layer_count(config)`` for a pipelined layout with --recompute-method block.
    """
    if recomputed_layers is None:
        recomputed_layers = _recomputed_in_chunk(model_cfg, model_cfg.num_layers)
    layers = 3 * model_cfg.num_layers + recomputed_layers
    logits = 2.0 * batch_size * model_cfg.seq_length * model_cfg.hidden_size * _vocab(model_cfg)
    return layers * layer_forward_flops(model_cfg, batch_size) + 3 * logits


def count_parameters(model_cfg: ModelConfig) -> int:
    """Parameters of the full (single-process) model: embeddings, layers, final LN, untied head."""
    h, f = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    q = model_cfg.kv_channels * model_cfg.num_attention_heads
    vocab = _vocab(model_cfg)
    embedding = vocab * h
    if model_cfg.position_embedding_type == "learned_absolute":
        embedding += model_cfg.max_position_embeddings * h
    layer = (2 * 2 * h                   # two LayerNorms (weight + bias)
             + h * 3 * q + 3 * q         # fused QKV
             + q * h + h                 # attention output projection
             + h * f + f + f * h + h)    # MLP
    head = 0 if not model_cfg.untie_embeddings_and_output_weights else vocab * h
    return embedding + model_cfg.num_layers * layer + 2 * h + head
