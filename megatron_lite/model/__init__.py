"""The GPT model: transformer layers with tensor-parallel linears, stage-able for pipelining."""
from megatron_lite.model.flops import count_parameters, num_floating_point_operations
from megatron_lite.model.gpt import GPTModel, build_model_chunks, layers_for_stage
from megatron_lite.model.masks import get_ltor_masks_and_position_ids
from megatron_lite.model.transformer import resolve_attention_backend

__all__ = ["GPTModel", "build_model_chunks", "layers_for_stage", "get_ltor_masks_and_position_ids",
           "num_floating_point_operations", "count_parameters", "resolve_attention_backend"]
