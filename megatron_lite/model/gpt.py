"""GPTModel: embedding (first stage), this stage's transformer layers, final LN + LM head (last stage).

    model = GPTModel(config.model, pstate)                 # one stage holding every layer
    loss = model(tokens, position_ids, labels=labels)      # per-token fp32 loss [b, s]
    logits = model(tokens, position_ids)                   # vocab-parallel logits [b, s, V/tp]

Pipeline stages build the same model with ``pre_process`` / ``post_process`` / ``layer_offset`` /
``num_layers`` from ``layers_for_stage``; a non-first stage takes its input through
``set_input_tensor``. Parameter names are the same for every TP degree; every weight is seeded by
its global name, so any TP x PP layout starts from the single-process model's weights.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import Config, ModelConfig, pad_vocab_size
from megatron_lite.model.rotary import RotaryEmbedding
from megatron_lite.model.transformer import TransformerBlock, resolve_attention_backend, seeded_init
from megatron_lite.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, column_parallel_linear
from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.parallel.mappings import scatter_to_sequence_parallel
from megatron_lite.parallel.random import get_rng_tracker
from megatron_lite.parallel.state import ParallelState, get_parallel_state

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def padded_vocab_size(config: ModelConfig, tp_size: int) -> int:
    if config.padded_vocab_size is not None:
        return config.padded_vocab_size
    if config.vocab_size is None:
        raise ValueError("ModelConfig needs vocab_size (--vocab-size or a tokenizer) or padded_vocab_size")
    return pad_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp_size)


class GPTEmbedding(nn.Module):
    """word (vocab-parallel) + learned absolute position embeddings -> [s, b, h] (or [s/tp, b, h] with SP)."""

    def __init__(self, config: ModelConfig, vocab_size: int, seed: int, sequence_parallel: bool,
                 pstate: ParallelState):
        super().__init__()
        self.pstate, self.sequence_parallel = pstate, sequence_parallel
        self.dropout_p = config.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, config.hidden_size, init_method=seeded_init(seed, WORD_EMBEDDINGS, config.init_method_std),
            params_dtype=config.params_dtype, pstate=pstate)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                    dtype=config.params_dtype, device=pstate.device)
            init = seeded_init(seed, "embedding.position_embeddings.weight", config.init_method_std)
            master = torch.empty(self.position_embeddings.weight.shape, dtype=torch.float32)
            init(master)  # drawn in fp32 on CPU exactly like the TP layers' master weights
            with torch.no_grad():
                self.position_embeddings.weight.copy_(master)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [b, s, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        x = x.transpose(0, 1).contiguous()  # [s, b, h]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel(x, self.pstate)
        if not (self.training and self.dropout_p > 0):
            return x
        # Sequence chunks (SP) need a dropout mask per TP rank; replicated activations the same one.
        with get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext():
            return F.dropout(x, self.dropout_p, training=True)


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig, pstate: Optional[ParallelState] = None, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: Optional[int] = None,
                 seed: int = 1234):
        super().__init__()
        ps = pstate if pstate is not None else get_parallel_state()
        self.config, self.pstate = config, ps
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset
        self.num_layers = config.num_layers if num_layers is None else num_layers
        self.vocab_size = padded_vocab_size(config, ps.tp_size)
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        self.tie_word_embeddings = not config.untie_embeddings_and_output_weights
        self.attention_backend = resolve_attention_backend(config)
        self.input_tensor: Optional[torch.Tensor] = None

        self.embedding = (GPTEmbedding(config, self.vocab_size, seed, self.sequence_parallel, ps)
                          if pre_process else None)
        self.rotary_pos_emb = None
        if config.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, config.rotary_base).to(ps.device)
        self.decoder = TransformerBlock(config, layer_offset, self.num_layers, seed, self.attention_backend,
                                        post_process, ps)

        self.output_layer = None
        self.word_embeddings_for_head = None
        if post_process and not self.tie_word_embeddings:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, self.vocab_size, bias=False, gather_output=False,
                init_method=seeded_init(seed, "output_layer.weight", config.init_method_std),
                sequence_parallel=self.sequence_parallel, params_dtype=config.params_dtype, pstate=ps)
        elif post_process and not pre_process:
            # Last pipeline stage with tied weights: its own copy of the word embeddings, seeded by
            # the same name as stage 0's, so both start equal; the trainer all-reduces their grads
            # over the embedding group to keep them equal.
            self.word_embeddings_for_head = VocabParallelEmbedding(
                self.vocab_size, config.hidden_size,
                init_method=seeded_init(seed, WORD_EMBEDDINGS, config.init_method_std),
                params_dtype=config.params_dtype, pstate=ps)
            self.word_embeddings_for_head.weight.shared_embedding = True
        if pre_process and not post_process and self.tie_word_embeddings:
            self.embedding.word_embeddings.weight.shared_embedding = True

    # ---- pipeline plumbing -------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """The activation received from the previous stage (a tensor or a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        """The word-embedding weight on the first stage, the LM-head weight on the last."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.output_layer is not None:
            return self.output_layer.weight
        if self.word_embeddings_for_head is not None:
            return self.word_embeddings_for_head.weight
        return None

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids/position_ids/labels [b, s]; attention_mask None (causal) or bool [b|1, 1, s, s]
        with True = masked. Returns the per-token fp32 loss [b, s] (last stage, labels given),
        vocab-parallel logits [b, s, V/tp] (last stage), or hidden states [s(/tp), b, h]."""
        if position_ids is None and input_ids is not None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        if self.pre_process:
            hidden = self.embedding(input_ids, position_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("GPTModel: a non-first pipeline stage needs set_input_tensor() before forward")
            hidden = self.input_tensor

        rotary = None
        if self.rotary_pos_emb is not None:
            if position_ids is None:
                seq = hidden.size(0) * (self.pstate.tp_size if self.sequence_parallel else 1)
                position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
            rotary = self.rotary_pos_emb(position_ids)

        hidden = self.decoder(hidden, attention_mask, rotary)
        if not self.post_process:
            return hidden
        logits = self._lm_logits(hidden)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous(),
                                            pstate=self.pstate)
        return loss.transpose(0, 1).contiguous()

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Megatron's parallel_lm_logits: enter the TP region, multiply by this rank's vocab shard."""
        if self.output_layer is not None:
            logits, _ = self.output_layer(hidden)
            return logits
        return column_parallel_linear(hidden, self.shared_embedding_or_output_weight(), None,
                                      self.sequence_parallel, self.pstate)


# ---- pipeline layout ------------------------------------------------------------------------

def layers_for_stage(num_layers: int, pp_size: int, pp_rank: int, first: Optional[int] = None,
                     last: Optional[int] = None, vp_size: Optional[int] = None,
                     vp_rank: int = 0) -> Tuple[int, int]:
    """(global index of the first layer, number of layers) held by pipeline rank ``pp_rank``
    (model chunk ``vp_rank`` of ``vp_size`` with interleaving), as Megatron-LM splits them.

    Even: L / pp layers per stage. Uneven: --decoder-first/last-pipeline-num-layers on the first/
    last stage, the rest split evenly over the middle stages. Interleaved: chunk v of stage p holds
    layers_per_chunk = L / (pp * vp) layers starting at v * (L / vp) + p * layers_per_chunk, so
    the chunks go round the stages in order (8 layers, pp 2, vp 2: [0,1] [4,5] | [2,3] [6,7]).
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside 0..{pp_size - 1}")
    if vp_size is not None:
        if first is not None or last is not None:
            raise ValueError("interleaved (virtual) pipeline stages cannot be combined with "
                             "--decoder-first/last-pipeline-num-layers")
        if not 0 <= vp_rank < vp_size or num_layers % (pp_size * vp_size) != 0:
            raise ValueError(f"cannot split {num_layers} layers into {pp_size} stages x {vp_size} chunks "
                             f"(chunk {vp_rank})")
        per_chunk = num_layers // (pp_size * vp_size)
        return vp_rank * (num_layers // vp_size) + pp_rank * per_chunk, per_chunk
    if pp_size == 1:
        return 0, num_layers
    if first is None and last is None:
        if num_layers % pp_size != 0:
            raise ValueError(f"--num-layers ({num_layers}) is not divisible by the {pp_size} pipeline stages")
        per_stage = num_layers // pp_size
        return pp_rank * per_stage, per_stage
    n_first, n_last = first or 0, last or 0
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - n_first - n_last
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0) or \
            (middle_stages > 0 and middle_layers % middle_stages != 0):
        raise ValueError(f"{num_layers} layers cannot be split over {pp_size} stages with first={first}, "
                         f"last={last}")
    if pp_rank == 0 and first is not None:
        return 0, first
    if pp_rank == pp_size - 1 and last is not None:
        return num_layers - last, last
    per_stage = middle_layers // middle_stages
    return n_first + (pp_rank - (first is not None)) * per_stage, per_stage


def virtual_pipeline_size(config: Config) -> Optional[int]:
    """Model chunks per stage under interleaving (None without it)."""
    per_chunk = config.parallel.num_layers_per_virtual_pipeline_stage
    pp = config.parallel.pipeline_model_parallel_size
    if per_chunk is None or pp == 1:
        return None
    return (config.model.num_layers // pp) // per_chunk


def build_model_chunks(config: Config, pstate: Optional[ParallelState] = None) -> List[GPTModel]:
    """This rank's model: one GPTModel, or one per virtual stage with interleaving (in chunk order).

    The embedding lives on chunk 0 of pipeline stage 0, the LM head on the last chunk of the last
    stage. Every chunk is seeded by global layer names, so the layout never changes the weights.
    """
    ps = pstate if pstate is not None else get_parallel_state()
    par = config.parallel
    vp_size = virtual_pipeline_size(config)
    if ps.virtual_pp_size is not None and vp_size is not None and ps.virtual_pp_size != vp_size:
        raise ValueError(f"the parallel state has {ps.virtual_pp_size} virtual stages but the config gives "
                         f"{vp_size} (--num-layers-per-virtual-pipeline-stage)")
    chunks = []
    n_chunks = vp_size or 1
    for vp_rank in range(n_chunks):
        offset, count = layers_for_stage(config.model.num_layers, ps.pp_size, ps.pp_rank,
                                         par.decoder_first_pipeline_num_layers,
                                         par.decoder_last_pipeline_num_layers, vp_size, vp_rank)
        chunks.append(GPTModel(config.model, ps,
                               pre_process=ps.pp_rank == 0 and vp_rank == 0,
                               post_process=ps.pp_rank == ps.pp_size - 1 and vp_rank == n_chunks - 1,
                               layer_offset=offset, num_layers=count, seed=config.train.seed))
    return chunks
