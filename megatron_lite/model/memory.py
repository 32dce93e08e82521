"""Memory per rank (Megatron-LM's theoretical memory report) and the pipeline bubble.

Per parameter held by a rank: its weights in the model dtype; its gradient in the contiguous
buffer (fp32 for fp16/bf16 models, which accumulate and reduce in fp32); Adam's two fp32 moments
plus, for fp16/bf16, an fp32 master copy. ZeRO-1 (``--use-distributed-optimizer``) keeps the
optimizer state of 1/DP of the parameters on each DP rank.

``estimate_memory(cfg)`` predicts all of it from the flags alone, activations included (see the
comment above it), so ``--dry-run`` and the layout benchmark show whether a layout fits before launch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional

ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weight of an fp16/bf16 parameter


@dataclass
class WeightMemory:
    params: int  # parameters held by this rank
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # without ZeRO-1
    optimizer_bytes_zero1: int  # with ZeRO-1 at this DP size
    dp_size: int
    zero1: bool  # whether this run shards the optimizer

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + (self.optimizer_bytes_zero1 if self.zero1 else self.optimizer_bytes)


def weight_memory(params: int, param_element_bytes: int, grad_elements: int, grad_element_bytes: int,
                  mixed: bool, dp_size: int, zero1: bool) -> WeightMemory:
    """``params`` held by this rank; ``grad_elements``: their gradient buffers' length (padding included)."""
    per_param = ADAM_BYTES + (MASTER_BYTES if mixed else 0)
    return WeightMemory(params=params, param_bytes=params * param_element_bytes,
                        grad_bytes=grad_elements * grad_element_bytes, optimizer_bytes=params * per_param,
                        optimizer_bytes_zero1=math.ceil(grad_elements / dp_size) * per_param,
                        dp_size=dp_size, zero1=zero1)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def format_weight_memory(mem: WeightMemory) -> str:
    used = "ZeRO-1" if mem.zero1 else "no ZeRO-1"
    return (f"> memory per rank (rank 0's stage; {used}): {mem.params:,} parameters: weights {_mib(mem.param_bytes)}, "
            f"gradients {_mib(mem.grad_bytes)}, optimizer state {_mib(mem.optimizer_bytes)} without ZeRO-1 / "
            f"{_mib(mem.optimizer_bytes_zero1)} with ZeRO-1 at DP={mem.dp_size}; total {_mib(mem.total_bytes)}")


# ---- the estimate from the flags alone (before launching) ------------------------------------
# Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
# Transformer Models", Sec. 4: one layer stores, per micro-batch of b sequences of s tokens,
#     sbh (34 + 5as/h) bytes                       (16-bit activations, 1-byte dropout masks)
#     sbh (10 + 24/t + 5as/(ht))                   with tensor parallelism over t ranks
#     sbh (34/t + 5as/(ht))                        with sequence parallelism too
# and selective recompute drops the 5as^2b/t attention term, full recompute keeps only each
# recomputed chunk's input. The terms below are the paper's, each named for the tensor it is,
# with the element size and the dropout-mask size as parameters (masks are 1-byte bools on CUDA;
# torch's CPU dropout keeps a mask in the activation dtype) and two places where this codebase
# differs from the paper's Megatron: the column-parallel layers keep their all-gathered input
# under sequence parallelism (Megatron re-gathers it in backward), so the QKV and MLP inputs stay
# 2sbh each; and the sdpa backend (flash / memory-efficient kernels) stores its output and
# log-sum-exp instead of the s^2 probabilities.


def _vocab_padded(m, tp: int) -> int:
    from megatron_lite.config import pad_vocab_size  # lazily: config imports nothing from here

    if m.padded_vocab_size is not None:
        return m.padded_vocab_size
    return pad_vocab_size(m.vocab_size or GPT2_VOCAB, m.make_vocab_size_divisible_by, tp)


GPT2_VOCAB = 50257  # the vocabulary assumed when neither --vocab-size nor a tokenizer has been read


def chunk_parameter_count(m, tp: int, layers: int, pre_process: bool, post_process: bool) -> int:
    """Parameters one TP rank holds for a model chunk of ``layers`` layers (as ``GPTModel`` builds it)."""
    h, f, q = m.hidden_size, m.ffn_hidden_size, m.kv_channels * m.num_attention_heads
    vocab_shard = _vocab_padded(m, tp) // tp * h
    layer = (4 * h                          # two LayerNorms, replicated
             + h * 3 * q // tp + 3 * q // tp  # fused QKV, column-parallel
             + q // tp * h + h              # attention projection, row-parallel (bias replicated)
             + h * f // tp + f // tp + f // tp * h + h)  # MLP
    n = layers * layer
    if pre_process:
        n += vocab_shard + (m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute" else 0)
    if post_process:
        n += 2 * h  # final LayerNorm
        if m.untie_embeddings_and_output_weights or not pre_process:
            n += vocab_shard  # the untied head, or the last stage's copy of the tied embedding
    return n


def _chunks(cfg, pp_rank: int):
    """[(layers, pre_process, post_process)] of pipeline rank ``pp_rank``'s model chunks."""
    from megatron_lite.parallel.layout import layers_for_stage

    par = cfg.parallel
    pp, vp = par.pipeline_model_parallel_size, cfg.virtual_pipeline_size()
    n = vp or 1
    out = []
    for v in range(n):
        _, count = layers_for_stage(cfg.model.num_layers, pp, pp_rank, par.decoder_first_pipeline_num_layers,
                                    par.decoder_last_pipeline_num_layers, vp, v)
        out.append((count, pp_rank == 0 and v == 0, pp_rank == pp - 1 and v == n - 1))
    return out


def layer_activation_terms(m, micro_batch_size: int, tp: int, element_bytes: int, mask_bytes: int,
                           backend: str) -> dict:
    """Bytes one layer stores for backward, per micro-batch, by tensor (no recompute)."""
    s, b, h, a = m.seq_length, micro_batch_size, m.hidden_size, m.num_attention_heads
    q, f = m.kv_channels * a, m.ffn_hidden_size
    sp = tp if m.sequence_parallel and tp > 1 else 1  # what sequence parallelism divides
    sbh = s * b * h
    hidden_mask = mask_bytes if m.hidden_dropout > 0 else 0
    attn_mask = mask_bytes if m.attention_dropout > 0 else 0
    terms = {
        "layernorm inputs": 2 * sbh * element_bytes / sp,
        "QKV and MLP inputs (all-gathered)": 2 * sbh * element_bytes,
        "Q, K, V": 3 * s * b * q * element_bytes / tp,
        "attention projection input": s * b * q * element_bytes / tp,
        "MLP GeLU input and output": 2 * s * b * f * element_bytes / tp,
        "hidden dropout masks": 2 * sbh * hidden_mask / sp,
    }
    if backend == "sdpa":
        terms["attention output and log-sum-exp (sdpa)"] = (s * b * q * element_bytes + a * s * b * 4) / tp
    else:  # Korthikanti's 5as^2b: softmax output, dropout mask, dropout output
        probs = a * s * s * b / tp
        terms["softmax output"] = probs * element_bytes
        if attn_mask:
            terms["attention dropout mask and output"] = probs * (attn_mask + element_bytes)
        terms["causal mask"] = s * s  # bool [s, s]; the Triton kernel masks by index instead
    return terms


def recompute_split(m, layers: int) -> tuple:
    """(layers stored in full, checkpointed chunks, layers per chunk) for a model chunk of ``layers``."""
    if m.recompute_granularity != "full" or layers == 0:
        return layers, 0, 0
    k = m.recompute_num_layers or 1
    if m.recompute_method == "block":
        ckpt = min(k, layers)
        return layers - ckpt, ckpt, 1
    return 0, math.ceil(layers / k), min(k, layers)


@dataclass
class RankMemoryEstimate:
    pp_rank: int
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # without ZeRO-1
    optimizer_bytes_zero1: int
    activation_bytes: int  # peak of the schedule's in-flight micro-batches, plus the logits' working copies
    in_flight: int  # (micro-batch, chunk) pairs held at once at the peak of the schedule
    zero1: bool

    @property
    def total_bytes(self) -> int:
        opt = self.optimizer_bytes_zero1 if self.zero1 else self.optimizer_bytes
        return self.param_bytes + self.grad_bytes + opt + self.activation_bytes


@dataclass
class MemoryEstimate:
    ranks: list  # one RankMemoryEstimate per pipeline stage (TP and DP ranks of a stage are alike)
    num_microbatches: int
    bubble_fraction: float
    schedule: str

    @property
    def max_total_bytes(self) -> int:
        return max(r.total_bytes for r in self.ranks)

    def as_dict(self) -> dict:
        return {"num_microbatches": self.num_microbatches, "bubble_fraction": self.bubble_fraction,
                "schedule": self.schedule, "max_total_bytes": self.max_total_bytes,
                "ranks": [dict(asdict(r), total_bytes=r.total_bytes) for r in self.ranks]}


_ATTENTION_CORE_TERMS = ("softmax output", "attention dropout mask and output", "causal mask",
                         "attention output and log-sum-exp (sdpa)")


def _chunk_activation_bytes(m, mbs: int, tp: int, e: int, mask: int, backend: str, layers: int,
                            pre: bool, post: bool) -> tuple:
    """(bytes a micro-batch holds from its forward to its backward, its bytes while a checkpointed
    chunk is recomputed and backpropagated, the logits' working copies during the loss)."""
    terms = layer_activation_terms(m, mbs, tp, e, mask, backend)
    full = sum(terms.values())
    if m.recompute_granularity == "selective":  # the core attention is recomputed in backward
        full -= sum(v for k, v in terms.items() if k in _ATTENTION_CORE_TERMS)
    s, b, h = m.seq_length, mbs, m.hidden_size
    sp = tp if m.sequence_parallel and tp > 1 else 1
    stored, ckpts, per_ckpt = recompute_split(m, layers)
    inputs = ckpts * s * b * h * e / sp  # a checkpointed chunk keeps its input only
    embedding = s * b * h * mask / sp if pre and m.hidden_dropout > 0 else 0.0  # embedding dropout mask
    held = stored * full + inputs + embedding
    transient = 0.0
    if post:
        v = _vocab_padded(m, tp) // tp
        held += s * b * h * e / sp + s * b * h * e  # final LayerNorm input; head input (all-gathered)
        held += s * b * v * 4 + s * b * 9  # cross-entropy's fp32 softmax; target mask and index
        # During the loss: the logits, and fp32 copies (the cast when not fp32, the max-shifted logits).
        transient = s * b * v * (e + 4 + (4 if e != 4 else 0))
    recompute = 0.0
    if ckpts:
        # Backward reaches a checkpointed chunk after everything above it is freed: the chunk's inputs
        # and the recomputed layers are live, plus the backward's gradients of the biggest tensors
        # (three of the s^2 attention tensors, or of Q/K/V with sdpa).
        big = terms.get("softmax output", terms["Q, K, V"] / 3)
        recompute = inputs + embedding + per_ckpt * full + 3 * big
    return held, recompute, transient


def estimate_memory(cfg, device_type: str = "cuda", backend: Optional[str] = None) -> MemoryEstimate:
    """Per pipeline stage: weights, gradients, optimizer state and activations of a validated ``cfg``.

    ``device_type`` sets the dropout-mask size (CUDA: 1-byte masks; CPU: masks in the activation
    dtype); ``backend`` the attention implementation (default: what ``--attention-backend`` resolves to).
    """
    from megatron_lite.parallel.schedule_orders import bubble_fraction, schedule_order

    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.data_parallel_size
    if backend is None:
        backend = "sdpa" if m.attention_backend == "auto" else m.attention_backend
    if backend == "sdpa" and device_type != "cuda" and m.attention_dropout > 0:
        backend = "unfused"  # torch's CPU sdpa has no fused kernel with dropout: its math path keeps s^2
    e = 2 if (m.fp16 or m.bf16) else 4
    mask = 1 if device_type == "cuda" else e
    mixed = m.fp16 or m.bf16
    num_mb = t.num_microbatches(dp)
    vp = cfg.virtual_pipeline_size() or 1
    schedule = par.pipeline_schedule if pp > 1 else "none"
    ranks = []
    for r in range(pp):
        chunks = _chunks(cfg, r)
        params = sum(chunk_parameter_count(m, tp, n, pre, post) for n, pre, post in chunks)
        w = weight_memory(params, e, params, 4 if mixed else e, mixed, dp, par.use_distributed_optimizer)
        per_chunk = [_chunk_activation_bytes(m, t.micro_batch_size, tp, e, mask, backend, *c) for c in chunks]
        order = schedule_order(schedule, pp, r, num_mb, vp) if pp > 1 else \
            [s for i in range(num_mb) for s in (("F", i, 0), ("B", i, 0))]
        live = peak = 0.0
        n_live = peak_n = 0
        for kind, _, c in order:
            held, recompute, transient = per_chunk[c]
            if kind == "F":
                live += held
                n_live += 1
                peak = max(peak, live + transient)
                peak_n = max(peak_n, n_live)
            else:
                if recompute:
                    peak = max(peak, live - held + recompute)
                live -= held
                n_live -= 1
        ranks.append(RankMemoryEstimate(r, params, w.param_bytes, w.grad_bytes, w.optimizer_bytes,
                                        w.optimizer_bytes_zero1, int(peak), peak_n, par.use_distributed_optimizer))
    bubble = bubble_fraction(pp, num_mb, vp) if pp > 1 else 0.0
    return MemoryEstimate(ranks, num_mb, bubble, schedule)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else _mib(n)


def format_memory_estimate(est: MemoryEstimate, device_bytes: Optional[int] = None,
                           device_name: Optional[str] = None) -> List[str]:
    """The dry run's lines: per stage, each part and the total; the bubble; whether it fits."""
    lines = [f"memory estimate per rank (Korthikanti et al. 2022 activations; {est.num_microbatches} "
             f"micro-batch(es) per step, schedule {est.schedule}):"]
    for r in est.ranks:
        zero = "ZeRO-1" if r.zero1 else "no ZeRO-1"
        lines.append(f"  stage {r.pp_rank}: {r.params:,} parameters: weights {_gib(r.param_bytes)}, gradients "
                     f"{_gib(r.grad_bytes)}, optimizer {_gib(r.optimizer_bytes)} (ZeRO-1: "
                     f"{_gib(r.optimizer_bytes_zero1)}), activations {_gib(r.activation_bytes)} "
                     f"({r.in_flight} in flight); total {_gib(r.total_bytes)} ({zero})")
    lines.append(f"pipeline bubble (p-1)/(m*v): {est.bubble_fraction:.3f}")
    if device_bytes:
        verdict = "fits" if est.max_total_bytes <= device_bytes else "does NOT fit"
        lines.append(f"largest rank {_gib(est.max_total_bytes)} of {_gib(device_bytes)} on {device_name}: {verdict} "
                     "(before the CUDA context and allocator fragmentation)")
    return lines
