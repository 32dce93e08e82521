"""What a checkpoint says about its own tensors, so tools never guess from model code.

Every model file carries ``param_meta``: for each model key ('model', or 'model0', 'model1', ...)
and each saved tensor, a record

    {"global_name": "decoder.layers.5.self_attention.query_key_value.weight",
     "tp_dim": 0, "tp_stride": 1,          # split over TP along this dim (None: replicated)
     "full_shape": [192, 64],              # the whole tensor (the padded vocabulary included)
     "vocab_padded": False,                # dim 0 is the padded vocabulary (embedding, LM head)
     "qkv_layout": "heads,3,head_dim",     # fused QKV rows: whole heads, each with its q, k, v
     "layer": 5, "pp_rank": 1, "chunk": 0, # global layer index (None outside the layers), stage, chunk
     "tied_copy": False}                   # the last stage's copy of the tied word embedding

and ``optimizer_params``: the [model key, tensor name] of each optimizer parameter index, in the
order the optimizer (and ZeRO-1's slices) number them. Global names are those of the
single-process model: layer indices count from the first stage, the vocabulary is unpadded.
"""
from __future__ import annotations

from typing import Dict, List

from megatron_lite.optim.optimizer import get_param_groups
from megatron_lite.parallel.params import is_tensor_parallel


def model_keys(num_chunks: int) -> List[str]:
    """Megatron's keys: 'model' for one chunk, 'model0', 'model1', ... with virtual pipeline stages."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def describe_params(model_chunks, pstate) -> Dict[str, Dict[str, dict]]:
    out = {}
    for c, (key, chunk) in enumerate(zip(model_keys(len(model_chunks)), model_chunks)):
        module = _unwrap(chunk)
        names = module.global_param_names() if hasattr(module, "global_param_names") else {}
        params = dict(module.named_parameters())
        entries = {}
        for local, tensor in module.state_dict().items():
            p = params.get(local, tensor)
            global_name, tied_copy = names.get(local, (local, False))
            tp_dim = int(p.partition_dim) if is_tensor_parallel(p) else None
            full = list(tensor.shape)
            if tp_dim is not None:
                full[tp_dim] *= pstate.tp_size
            layer = None
            if global_name.startswith("decoder.layers."):
                layer = int(global_name.split(".")[2])
            entries[local] = {
                "global_name": global_name, "tp_dim": tp_dim, "tp_stride": int(getattr(p, "partition_stride", 1)),
                "full_shape": full, "vocab_padded": global_name in VOCAB_PADDED,
                "qkv_layout": "heads,3,head_dim" if "query_key_value" in global_name else None,
                "layer": layer, "pp_rank": pstate.pp_rank, "chunk": c, "tied_copy": tied_copy,
            }
        out[key] = entries
    return out


VOCAB_PADDED = ("embedding.word_embeddings.weight", "output_layer.weight")


def optimizer_param_names(model_chunks, weight_decay: float = 0.0) -> List[List[str]]:
    """[model key, tensor name] per optimizer index (the grouping does not depend on the decay value)."""
    where = {}
    for key, chunk in zip(model_keys(len(model_chunks)), model_chunks):
        for name, p in _unwrap(chunk).named_parameters():
            where[id(p)] = [key, name]
    return [where[id(p)] for g in get_param_groups(model_chunks, weight_decay) for p in g["params"]]

