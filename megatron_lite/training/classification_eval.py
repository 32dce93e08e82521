"""Classification metrics of a trained model on whole splits: accuracy, per-class precision and
recall, the confusion matrix, the majority-class baseline.

Every sample of a split is scored once: the split is read in global batches through the run's own
schedule (forward only, so any TP x PP x DP layout works); the last batch is filled by wrapping
around and the extra predictions are dropped. Each DP rank's predictions are put back in sample
order by the sampler's own index rule, then gathered on the logging rank.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.training.batch import build_data_iterators, microbatch_sample_indices


def _predict(trainer, dataset, split: str) -> Optional[np.ndarray]:
    """Predicted class of every sample of ``dataset`` (in order) on the logging rank, None elsewhere."""
    cfg, ps = trainer.cfg, trainer.pstate
    m, t = cfg.model, cfg.train
    n_mb, gbs = trainer.num_microbatches, t.global_batch_size
    rounds = math.ceil(len(dataset) / gbs)
    preds = torch.full((rounds * gbs,), -1, dtype=torch.long, device=ps.device)
    for chunk in trainer.model:
        chunk.eval()
    with torch.no_grad():
        for r in range(rounds):
            its = build_data_iterators(_Wrapped(dataset, rounds * gbs), r * gbs, t.micro_batch_size, n_mb, ps,
                                       trainer.tokenizer.eod, m, num_chunks=len(trainer.model), split=split)
            dicts = trainer.forward_backward(
                forward_step_func=trainer.forward_step_func, data_iterator=its, model=trainer.model,
                num_microbatches=n_mb, seq_length=m.seq_length, micro_batch_size=t.micro_batch_size,
                hidden_size=m.hidden_size, pstate=ps, forward_only=True, dtype=m.params_dtype,
                sequence_parallel=m.sequence_parallel)
            if ps.is_pipeline_last_stage():
                index = microbatch_sample_indices(r * gbs, t.micro_batch_size, ps.dp_rank, ps.dp_size, n_mb)
                for idx, d in zip(index, dicts):
                    preds[idx] = d["predictions"].to(ps.device)
    for chunk in trainer.model:
        chunk.train()
    if not ps.is_pipeline_last_stage():
        return None
    if ps.dp_size > 1:
        # Each replica filled only its own samples; the others are -1, so MAX merges them.
        dist.all_reduce(preds, op=dist.ReduceOp.MAX, group=ps.dp_group)
    return preds[:len(dataset)].cpu().numpy() if ps.is_logging_rank else None


class _Wrapped:
    """``dataset`` read past its end by wrapping around (the last global batch is filled up)."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.dataset[i % len(self.dataset)]


def classification_metrics(targets: np.ndarray, preds: np.ndarray, names: List[str],
                           majority_class: int) -> Dict:
    """Accuracy, per-class precision / recall, confusion matrix (rows: true class, columns: predicted)."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (targets, preds), 1)
    per_class = {}
    for c, name in enumerate(names):
        tp, predicted, actual = confusion[c, c], confusion[:, c].sum(), confusion[c, :].sum()
        per_class[name] = {"precision": float(tp / predicted) if predicted else 0.0,
                           "recall": float(tp / actual) if actual else 0.0, "support": int(actual)}
    n = len(targets)
    return {"examples": n, "accuracy": float(np.trace(confusion) / n) if n else 0.0,
            "majority_baseline_accuracy": float(np.mean(targets == majority_class)) if n else 0.0,
            "macro_precision": float(np.mean([v["precision"] for v in per_class.values()])),
            "macro_recall": float(np.mean([v["recall"] for v in per_class.values()])),
            "per_class": per_class, "confusion_matrix": confusion.tolist()}


def evaluate_splits(trainer, ft, summary) -> Optional[dict]:
    """Score the valid and test splits; print one line each and write ``ft.results_json`` (logging rank)."""
    from megatron_lite.data.classification_dataset import ClassificationDataset
    from megatron_lite.io_utils import write_json_atomic

    cfg, ps = trainer.cfg, trainer.pstate
    names = ft.label_names
    seq, eod = cfg.model.seq_length, trainer.tokenizer.eod
    train_labels = ClassificationDataset(ft.train_data, seq, eod, len(names)).labels
    majority = int(np.bincount(train_labels, minlength=len(names)).argmax())
    results = {"task": "classification", "iteration": trainer.iteration, "labels": names,
               "majority_class": names[majority], "splits": {}}
    for split, prefix in (("valid", ft.valid_data), ("test", ft.test_data)):
        if prefix is None:
            continue
        dataset = ClassificationDataset(prefix, seq, eod, len(names))
        preds = _predict(trainer, dataset, split)
        if preds is None:
            continue
        metrics = classification_metrics(dataset.labels, preds, names, majority)
        metrics["predictions"] = preds.tolist()  # class ids, in the split's example order
        results["splits"][split] = metrics
        print(f"> {split}: accuracy {metrics['accuracy']:.4f} on {metrics['examples']} examples "
              f"(majority-class baseline {metrics['majority_baseline_accuracy']:.4f}: {names[majority]!r}); "
              f"macro precision {metrics['macro_precision']:.4f}, macro recall {metrics['macro_recall']:.4f}",
              flush=True)
    if not ps.is_logging_rank:
        return None
    summary.classification = results
    if ft.results_json:
        write_json_atomic(ft.results_json, results)
        print(f"> wrote {ft.results_json}", flush=True)
    return results
