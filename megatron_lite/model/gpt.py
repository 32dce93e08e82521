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
from megatron_lite.model.heads import LMHead
from megatron_lite.model.rotary import RotaryEmbedding
from megatron_lite.model.transformer import TransformerBlock, resolve_attention_backend, seeded_init
from megatron_lite.parallel.layout import layers_for_stage
from megatron_lite.parallel.layers import VocabParallelEmbedding
from megatron_lite.parallel.mappings import scatter_to_sequence_parallel
from megatron_lite.parallel.params import mark_shared_embedding
from megatron_lite.parallel.random import get_rng_tracker
from megatron_lite.parallel.state import ParallelState, require_state

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
        ps = require_state(pstate)
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

        self.output_layer = None  # the head (model/heads.py) on the last stage
        self.word_embeddings_for_head = None
        if post_process:
            self.output_layer = LMHead(
                config.hidden_size, self.vocab_size, ps, tied=self.tie_word_embeddings,
                sequence_parallel=self.sequence_parallel,
                init_method=seeded_init(seed, "output_layer.weight", config.init_method_std),
                params_dtype=config.params_dtype)
        if post_process and not pre_process and self.tie_word_embeddings:
            # Last pipeline stage with tied weights: its own copy of the word embeddings, seeded by
            # the same name as stage 0's, so both start equal; the trainer all-reduces their grads
            # over the embedding group to keep them equal.
            self.word_embeddings_for_head = VocabParallelEmbedding(
                self.vocab_size, config.hidden_size,
                init_method=seeded_init(seed, WORD_EMBEDDINGS, config.init_method_std),
                params_dtype=config.params_dtype, pstate=ps)
            mark_shared_embedding(self.word_embeddings_for_head.weight)
        if pre_process and not post_process and self.tie_word_embeddings:
            mark_shared_embedding(self.embedding.word_embeddings.weight)

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
        if self.word_embeddings_for_head is not None:
            return self.word_embeddings_for_head.weight
        return getattr(self.output_layer, "weight", None)

    def global_param_names(self) -> dict:
        """{state-dict name: (name in the single-process model, is the last stage's tied copy)}: layer
        indices counted from the first stage (checkpoints record these; tools convert by them)."""
        out = {}
        for local in self.state_dict():
            name, tied_copy = local, False
            if local.startswith("decoder.layers."):
                i, rest = local[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{int(i) + self.layer_offset}.{rest}"
            elif local == "word_embeddings_for_head.weight":
                name, tied_copy = WORD_EMBEDDINGS, True
            out[local] = (name, tied_copy)
        return out

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, kv_cache=None) -> torch.Tensor:
        """input_ids/position_ids/labels [b, s]; attention_mask None (causal) or bool [b|1, 1, s, s]
        with True = masked. Returns the per-token fp32 loss [b, s] (last stage, labels given),
        vocab-parallel logits [b, s, V/tp] (last stage), or hidden states [s(/tp), b, h].
        ``kv_cache`` (inference/kv_cache.py): the inputs are only the positions after the cached
        ones, and position_ids say where they are."""
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

        hidden = self.decoder(hidden, attention_mask, rotary, kv_cache)
        if not self.post_process:
            return hidden
        head_weight = None if getattr(self.output_layer, "weight", None) is not None else \
            self.shared_embedding_or_output_weight()
        output = self.output_layer(hidden, head_weight)  # [s, b, V/tp] for the LM head
        if labels is None:
            return output.transpose(0, 1).contiguous()
        return self.output_layer.loss(output, labels)


# ---- pipeline layout ------------------------------------------------------------------------

def build_model_chunks(config: Config, pstate: Optional[ParallelState] = None) -> List[GPTModel]:
    """This rank's model: one GPTModel, or one per virtual stage with interleaving (in chunk order).

    The embedding lives on chunk 0 of pipeline stage 0, the LM head on the last chunk of the last
    stage. Every chunk is seeded by global layer names, so the layout never changes the weights.
    """
    ps = require_state(pstate)
    par = config.parallel
    vp_size = config.virtual_pipeline_size()
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
