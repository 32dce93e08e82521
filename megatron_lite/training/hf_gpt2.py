"""HuggingFace GPT-2 (``GPT2LMHeadModel``) <-> megatron_lite's whole-model tensors.

Both directions work on *global* tensors: full (not TP-split) weights named as a single-process
megatron_lite model names them, with global layer indices and the vocabulary unpadded
(``checkpoint_convert`` does the splitting, merging and padding). The differences:

- HF's ``Conv1D`` stores weights as [in, out]; ours are [out, in] (``nn.Linear``): transposed;
- our fused QKV rows are laid out [heads, 3, head_dim] (each TP rank holds whole heads with their
  q, k and v); HF's ``c_attn`` columns are [3, heads, head_dim]: reordered;
- HF ties ``lm_head`` to ``wte`` and has learned absolute positions, LayerNorm, and GeLU
  (``gelu`` exact, or ``gelu_new`` = tanh approximation = our ``--openai-gelu``).

A model HF GPT-2 cannot express is refused by ``check_exportable`` with the setting that prevents it.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

import torch

from megatron_lite.errors import CheckpointError

LAYER_MAP = (  # (ours under decoder.layers.{i}., HF under transformer.h.{i}., kind)
    ("input_layernorm.weight", "ln_1.weight", "copy"),
    ("input_layernorm.bias", "ln_1.bias", "copy"),
    ("self_attention.query_key_value.weight", "attn.c_attn.weight", "qkv_weight"),
    ("self_attention.query_key_value.bias", "attn.c_attn.bias", "qkv_bias"),
    ("self_attention.dense.weight", "attn.c_proj.weight", "transpose"),
    ("self_attention.dense.bias", "attn.c_proj.bias", "copy"),
    ("post_attention_layernorm.weight", "ln_2.weight", "copy"),
    ("post_attention_layernorm.bias", "ln_2.bias", "copy"),
    ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", "transpose"),
    ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", "copy"),
    ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", "transpose"),
    ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", "copy"),
)
TOP_MAP = (
    ("embedding.word_embeddings.weight", "transformer.wte.weight"),
    ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    ("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
    ("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
)


def check_exportable(model: dict) -> None:
    """``model``: the saved ModelConfig as a dict. Raises one line naming what HF GPT-2 lacks."""
    why = []
    if model.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        why.append(f"--position-embedding-type {model['position_embedding_type']} (GPT-2 has learned absolute "
                   "positions)")
    if model.get("untie_embeddings_and_output_weights"):
        why.append("--untie-embeddings-and-output-weights (GPT-2 ties lm_head to wte)")
    if why:
        raise CheckpointError("cannot export to HuggingFace GPT-2: the model uses " + "; ".join(why))


def hf_config(model: dict) -> dict:
    """config.json of the GPT2LMHeadModel equal to ``model`` (our ModelConfig as a dict)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model["vocab_size"], "n_positions": model["max_position_embeddings"],
        "n_embd": model["hidden_size"], "n_layer": model["num_layers"], "n_head": model["num_attention_heads"],
        "n_inner": model["ffn_hidden_size"], "layer_norm_epsilon": model["layernorm_epsilon"],
        "activation_function": "gelu_new" if model.get("openai_gelu") else "gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": model.get("init_method_std", 0.02), "scale_attn_weights": True,
        "tie_word_embeddings": True, "bos_token_id": model["vocab_size"] - 1, "eos_token_id": model["vocab_size"] - 1,
        "torch_dtype": "bfloat16" if model.get("bf16") else "float16" if model.get("fp16") else "float32",
    }


def model_config_from_hf(cfg: dict) -> dict:
    """Our ModelConfig fields for a GPT-2 config.json (refusing what we cannot run)."""
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"config.json: activation_function {act!r} is not supported (gelu or gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise CheckpointError(f"config.json: {flag} is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise CheckpointError("config.json: scale_attn_weights false is not supported")
    h = cfg["n_embd"]
    return {"num_layers": cfg["n_layer"], "hidden_size": h, "num_attention_heads": cfg["n_head"],
            "ffn_hidden_size": cfg.get("n_inner") or 4 * h, "seq_length": cfg["n_positions"],
            "max_position_embeddings": cfg["n_positions"], "vocab_size": cfg["vocab_size"],
            "layernorm_epsilon": cfg.get("layer_norm_epsilon", 1e-5), "openai_gelu": act != "gelu",
            "position_embedding_type": "learned_absolute", "untie_embeddings_and_output_weights": False,
            "init_method_std": cfg.get("initializer_range", 0.02)}


def _qkv_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads*3*hd, ...] rows in [heads, 3, hd] order -> [3*heads*hd, ...] in [3, heads, hd] order."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _qkv_from_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def to_hf(get: Callable[[str], torch.Tensor], model: dict) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every GPT2LMHeadModel weight; ``get(global_name)`` returns ours."""
    check_exportable(model)
    heads = model["num_attention_heads"]
    for ours, theirs in TOP_MAP:
        yield theirs, get(ours)
    for i in range(model["num_layers"]):
        for ours, theirs, kind in LAYER_MAP:
            t = get(f"decoder.layers.{i}.{ours}")
            if kind == "transpose":
                t = t.t()
            elif kind == "qkv_weight":
                t = _qkv_to_hf(t, heads).t()
            elif kind == "qkv_bias":
                t = _qkv_to_hf(t, heads)
            yield f"transformer.h.{i}.{theirs}", t.contiguous()


def from_hf(hf: Dict[str, torch.Tensor], model: dict) -> Dict[str, torch.Tensor]:
    """Our global tensors from a GPT2LMHeadModel state dict (``transformer.`` prefix optional)."""
    def take(name: str) -> torch.Tensor:
        for key in (name, name[len("transformer."):]):
            if key in hf:
                return hf[key]
        raise CheckpointError(f"the HuggingFace checkpoint has no {name!r}; is it a GPT-2 model?")

    heads = model["num_attention_heads"]
    out = {ours: take(theirs) for ours, theirs in TOP_MAP}
    for i in range(model["num_layers"]):
        for ours, theirs, kind in LAYER_MAP:
            t = take(f"transformer.h.{i}.{theirs}")
            if kind == "transpose":
                t = t.t()
            elif kind == "qkv_weight":
                t = _qkv_from_hf(t.t(), heads)
            elif kind == "qkv_bias":
                t = _qkv_from_hf(t, heads)
            out[f"decoder.layers.{i}.{ours}"] = t.contiguous()
    return out
