"""Fine-tune a GPT at any TP x PP x DP layout: instruction following (SFT) or text classification.

    torchrun --nproc_per_node N -m megatron_lite.finetune_gpt --task sft \\
        --train-data OUT_train --valid-data OUT_valid --finetune --load PRETRAINED <model flags>
    python -m megatron_lite.finetune_gpt --task classification --train-data OUT_train ... \\
        --results-json results.json

Both tasks are providers handed to the generic trainer, as ``pretrain_gpt`` is:

- **sft**: samples from ``data/sft_dataset.py``, packed up to --seq-length with attention and
  positions reset at each example's end (``--no-pack``: one per sample), the loss on response tokens
  only, averaged over the response tokens of the global batch (``--calculate-per-token-loss``,
  forced on). ``--finetune --load`` loads the LM's weights through the trainer.
- **classification**: the LM head replaced by ``model/heads.py``'s ``ClassificationHead`` over the
  last text token; ``--finetune --load`` loads the pretrained weights here, before the head is
  swapped (the trainer's load would refuse a checkpoint without the head). After training, the
  valid and test splits are scored in full: accuracy, per-class precision/recall, confusion matrix
  (``--results-json``).

``--freeze-layers N`` / ``--train-last-layers N`` train only the top of the network (the embedding
is frozen with the first layers; with tied embeddings that freezes an LM head too).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field, fields
from typing import List, Optional

from megatron_lite.cli import run_distributed_main
from megatron_lite.errors import ConfigError

TASKS = ("sft", "classification")


@dataclass
class FinetuneConfig:
    task: str = "sft"
    train_data: Optional[str] = None
    valid_data: Optional[str] = None
    test_data: Optional[str] = None
    labels_file: Optional[str] = None  # classification; default beside the train shards
    no_pack: bool = False
    freeze_layers: int = 0
    train_last_layers: Optional[int] = None
    results_json: Optional[str] = None
    pretrained: Optional[str] = None  # classification --finetune: loaded by the model provider
    label_names: List[str] = field(default_factory=list)

    def check(self, num_layers: int) -> None:
        from megatron_lite.data.data_spec import check_prefix_files

        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r}: choose {' or '.join(TASKS)}")
        if not self.train_data:
            raise ConfigError("--train-data PREFIX is required (the train split written by "
                              f"tools/preprocess_{'sft' if self.task == 'sft' else 'classification'}.py)")
        suffixes = self._suffixes()
        for flag, prefix in (("--train-data", self.train_data), ("--valid-data", self.valid_data),
                             ("--test-data", self.test_data)):
            for suffix in suffixes if prefix else ():
                try:
                    check_prefix_files(prefix + suffix, flag)
                except Exception as e:  # noqa: BLE001 - a DatasetError; reported as the flag's error
                    raise ConfigError(str(e)) from None
        if self.no_pack and self.task != "sft":
            raise ConfigError("--no-pack applies to --task sft (classification samples are never packed)")
        if self.freeze_layers and self.train_last_layers is not None:
            raise ConfigError("--freeze-layers and --train-last-layers are exclusive; give one")
        if not 0 <= self.freeze_layers <= num_layers:
            raise ConfigError(f"--freeze-layers must lie in [0, --num-layers {num_layers}], got {self.freeze_layers}")
        if self.train_last_layers is not None and not 0 <= self.train_last_layers <= num_layers:
            raise ConfigError(f"--train-last-layers must lie in [0, --num-layers {num_layers}], "
                              f"got {self.train_last_layers}")
        if self.task == "classification":
            from megatron_lite.data.classification_dataset import read_label_names
            if self.labels_file is None:
                base = self.train_data[:-len("_train")] if self.train_data.endswith("_train") else self.train_data
                self.labels_file = base + "_labels.json"
            try:
                self.label_names = read_label_names(self.labels_file)
            except Exception as e:  # noqa: BLE001 - a DatasetError naming the file
                raise ConfigError(f"--labels-file: {e}") from None

    def check_stages(self, cfg) -> None:
        """Every pipeline rank keeps something to train (an optimizer over no parameters is refused)."""
        from megatron_lite.parallel.layout import layers_for_stage

        par, below = cfg.parallel, self.frozen_below(cfg.model.num_layers)
        pp, vp = par.pipeline_model_parallel_size, cfg.virtual_pipeline_size()
        for rank in range(pp - 1):  # the last stage always trains its final layer norm and head
            spans = [layers_for_stage(cfg.model.num_layers, pp, rank, par.decoder_first_pipeline_num_layers,
                                      par.decoder_last_pipeline_num_layers, vp, v) for v in range(vp or 1)]
            if below > 0 and all(offset + count <= below for offset, count in spans):
                raise ConfigError(f"--freeze-layers/--train-last-layers freeze every parameter of pipeline stage "
                                  f"{rank} (layers below {below} and the embedding); train more layers or use "
                                  "fewer pipeline stages")

    def _suffixes(self):
        if self.task == "sft":
            from megatron_lite.data.sft_dataset import MASK_SUFFIX, TEXT_SUFFIX
            return (TEXT_SUFFIX, MASK_SUFFIX)
        from megatron_lite.data.classification_dataset import LABEL_SUFFIX, TEXT_SUFFIX
        return (TEXT_SUFFIX, LABEL_SUFFIX)

    def frozen_below(self, num_layers: int) -> int:
        """Layers [0, K) and the embedding are frozen (K = 0: nothing is)."""
        if self.train_last_layers is not None:
            return num_layers - self.train_last_layers
        return self.freeze_layers


def build_parser():
    from megatron_lite.arguments import build_parser as base_parser

    p = base_parser()
    p.prog = "megatron_lite.finetune_gpt"
    p.description = "Fine-tune a GPT for instructions (SFT) or text classification."
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--task", choices=TASKS, default="sft")
    g.add_argument("--train-data", default=None, help="train split prefix (tools/preprocess_sft.py or "
                                                      "tools/preprocess_classification.py)")
    g.add_argument("--valid-data", default=None, help="validation split prefix (loss during training)")
    g.add_argument("--test-data", default=None, help="test split prefix (loss / accuracy at the end)")
    g.add_argument("--labels-file", default=None, help="class names (default: PREFIX_labels.json beside "
                                                       "the train split)")
    g.add_argument("--no-pack", action="store_true", help="sft: one example per sample, padded")
    g.add_argument("--freeze-layers", type=int, default=0, help="freeze the embedding and the first N layers")
    g.add_argument("--train-last-layers", type=int, default=None,
                   help="train only the last N layers, the final layer norm and the head")
    g.add_argument("--results-json", default=None, help="classification: metrics of the valid/test splits")
    return p


def parse_args(argv: Optional[List[str]] = None):
    from megatron_lite.config import from_namespace

    ns = build_parser().parse_args(argv)
    ft = FinetuneConfig(**{f.name: getattr(ns, f.name) for f in fields(FinetuneConfig) if hasattr(ns, f.name)})
    return from_namespace(ns), ft


def prepare(cfg, ft: FinetuneConfig) -> None:
    """Settle the flags the task implies, before the trainer validates them."""
    from megatron_lite.data.sft_dataset import TEXT_SUFFIX

    ft.check(cfg.model.num_layers)
    ft.check_stages(cfg)
    if ft.task == "classification" and cfg.model.eod_mask_loss:
        # The class is read at the one position the loss mask marks; masking it would leave none.
        raise ConfigError("--eod-mask-loss does not apply to --task classification: drop it")
    cfg.data.data_path = [ft.train_data + TEXT_SUFFIX]  # the trainer's own checks look at the train shard
    cfg.train.calculate_per_token_loss = True
    if ft.task == "sft" and not ft.no_pack:
        cfg.model.reset_attention_mask = cfg.model.reset_position_ids = True
    if ft.task == "classification" and cfg.train.finetune and cfg.train.load:
        ft.pretrained, cfg.train.load = cfg.train.load, None


# ---- providers -------------------------------------------------------------------------------
def datasets_provider(ft: FinetuneConfig, cfg, tokenizer, num_samples):
    from megatron_lite.data.builder import check_token_ids, vocab_source
    from megatron_lite.data.classification_dataset import ClassificationDataset
    from megatron_lite.data.sft_dataset import SFTDataset

    seq, seed, eod = cfg.model.seq_length, cfg.train.seed, tokenizer.eod
    out = []
    for split, prefix, n in zip(("train", "valid", "test"), (ft.train_data, ft.valid_data, ft.test_data),
                                num_samples):
        if prefix is None or n == 0:
            out.append(None)
            continue
        shuffle = split == "train"
        if ft.task == "sft":
            ds = SFTDataset(prefix, seq, eod, pack=not ft.no_pack, num_samples=n, shuffle=shuffle, seed=seed)
        else:
            ds = ClassificationDataset(prefix, seq, eod, len(ft.label_names), num_samples=n, shuffle=shuffle,
                                       seed=seed)
        check_token_ids(ds.texts, tokenizer.vocab_size, vocab_source(cfg.data, tokenizer.vocab_size))
        out.append(ds)
    return tuple(out)


def model_provider(ft: FinetuneConfig, cfg, pstate):
    from megatron_lite.model.gpt import build_model_chunks

    chunks = build_model_chunks(cfg, pstate)
    if ft.task == "classification":
        if ft.pretrained:
            _load_pretrained(ft.pretrained, chunks, cfg, pstate)
        _replace_heads(chunks, cfg, pstate, len(ft.label_names))
    freeze(chunks, ft.frozen_below(cfg.model.num_layers))
    return chunks


def _load_pretrained(path: str, chunks, cfg, pstate) -> None:
    from megatron_lite.training.checkpoint import load_checkpoint

    load_checkpoint(path, chunks, pstate=pstate, load_optim=False, load_rng=False, expected_config=cfg.to_dict())
    if pstate.rank == 0:
        print(f"> --finetune: loaded the weights of {path}; classification head initialised; starting at "
              "iteration 0", flush=True)


def _replace_heads(chunks, cfg, pstate, num_classes: int) -> None:
    from megatron_lite.model.heads import ClassificationHead
    from megatron_lite.model.transformer import seeded_init

    m = cfg.model
    for chunk in chunks:
        if chunk.post_process:
            chunk.output_layer = ClassificationHead(
                m.hidden_size, num_classes, pstate, sequence_parallel=chunk.sequence_parallel,
                init_method=seeded_init(cfg.train.seed, "output_layer.classifier.weight", m.init_method_std),
                params_dtype=m.params_dtype)


def freeze(chunks, below: int) -> None:
    """No gradient (so no optimizer state, no update) for the embedding and layers [0, below)."""
    if below <= 0:
        return
    for chunk in chunks:
        if chunk.embedding is not None:
            chunk.embedding.requires_grad_(False)
        if chunk.word_embeddings_for_head is not None:
            # The last stage's copy of a tied embedding: frozen with the original, or the two stages
            # would disagree on the embedding-group reduction.
            chunk.word_embeddings_for_head.requires_grad_(False)
        for i, layer in enumerate(chunk.decoder.layers):
            if chunk.layer_offset + i < below:
                layer.requires_grad_(False)


# ---- forward steps ---------------------------------------------------------------------------
def classification_loss(labels, loss_mask, logits):
    """Cross-entropy of each sample's class at its last text token: (sum, report with predictions)."""
    import torch
    import torch.nn.functional as F

    rows = torch.arange(logits.size(0), device=logits.device)
    last = loss_mask.argmax(dim=1)
    scores = logits[rows, last].float()  # [b, C]
    target = labels[rows, last]
    total = F.cross_entropy(scores, target, reduction="sum")
    return total, {"lm loss": total.detach(), "num_tokens": torch.tensor(float(len(target))),
                   "predictions": scores.argmax(-1).detach(), "targets": target.detach()}


def classification_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # last stage: [b, s, C]
    return output, functools.partial(classification_loss, batch["labels"], batch["loss_mask"])


def forward_step_for(ft: FinetuneConfig, cfg):
    from megatron_lite import pretrain_gpt

    return classification_forward_step if ft.task == "classification" else pretrain_gpt.forward_step_for(cfg)


def after_training(ft: FinetuneConfig, trainer, summary) -> None:
    if ft.task != "classification":
        return
    from megatron_lite.training.classification_eval import evaluate_splits

    evaluate_splits(trainer, ft, summary)


def finetune_gpt(cfg, ft: FinetuneConfig, world_size: Optional[int] = None):
    """Run the fine-tuning task of ``ft`` for ``cfg``; returns the trainer's summary (with
    ``summary.classification`` holding the metrics of a classification run on the logging rank)."""
    from megatron_lite.training.trainer import pretrain

    prepare(cfg, ft)
    return pretrain(cfg, functools.partial(datasets_provider, ft), functools.partial(model_provider, ft),
                    forward_step_for(ft, cfg), world_size=world_size,
                    after_training=functools.partial(after_training, ft))


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_lite import pretrain_gpt

    cfg, ft = parse_args(argv)

    def body() -> int:
        if cfg.train.dry_run:
            prepare(cfg, ft)
            return pretrain_gpt.dry_run(cfg)
        finetune_gpt(cfg, ft)
        return 0

    return run_distributed_main(body)


if __name__ == "__main__":
    sys.exit(main())
