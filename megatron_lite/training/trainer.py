"""The training loop for any task: providers in, schedule -> finalize grads -> step out.

    summary = pretrain(cfg, datasets_provider, model_provider, forward_step_func)

as Megatron-LM's ``pretrain(train_valid_test_datasets_provider, model_provider, forward_step_func)``.
The task (``megatron_lite/pretrain_gpt.py`` for GPT pretraining) supplies:

- ``model_provider(cfg, pstate) -> [chunk, ...]``: this rank's model chunks;
- ``datasets_provider(cfg, tokenizer, [n_train, n_valid, n_test]) -> (train, valid, test)``: datasets
  whose samples are dicts with ``"text"`` (seq + 1 token ids) and optionally ``"loss_mask"``;
- ``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)``, with
  ``loss_func(output_tensor) -> (loss, {"lm loss": loss})`` on the last stage.

Order of setup (as Megatron-LM's ``pretrain``): validate the flags against WORLD_SIZE before any
process group exists; build the groups; seed; tokenizer -> padded vocabulary; model chunks;
optimizer and lr schedule; optional checkpoint load; datasets sized as Megatron sizes them.
Every iteration: the schedule runs forward/backward over this rank's micro-batches, then
``finalize_model_grads`` reduces over DP / sequence-parallel / embedding groups, then the
optimizer clips and steps, then the lr schedule advances (only when the step was taken).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lite.cli import is_peer_lost
from megatron_lite.config import Config, pad_vocab_size, validate
from megatron_lite.errors import RankStalledError
from megatron_lite.distributed.data_parallel import DistributedDataParallel, describe_buckets
from megatron_lite.distributed.finalize_grads import finalize_model_grads
from megatron_lite.model.memory import format_weight_memory, weight_memory
from megatron_lite.optim.clip import model_parallel_all_reduce
from megatron_lite.optim.lr_schedule import build_lr_scheduler
from megatron_lite.optim.optimizer import build_optimizer
from megatron_lite.parallel.params import param_is_duplicate
from megatron_lite.parallel.schedule_stats import ScheduleStats
from megatron_lite.training.batch import build_data_iterators
from megatron_lite.training.heartbeat import Heartbeat
from megatron_lite.training.token_loss import reduce_token_loss, scale_to_token_mean, token_loss_sums, token_mean
from megatron_lite.training.metrics import (MetricsWriter, OutputPathError, StepTimers, Timer, format_eval_line,
                                            format_train_line, memory_stats, peak_memory_bytes, perplexity,
                                            resolve_peak_tflops, throughput)


@dataclass
class TrainSummary:
    """What ``pretrain`` returns; the loss lists are filled on the logging rank (None elsewhere)."""
    iteration: int = 0
    consumed_samples: int = 0
    losses: List[Optional[float]] = field(default_factory=list)  # one per iteration, DP-averaged
    grad_norms: List[Optional[float]] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)  # lr used by each iteration's update
    skipped_iters: int = 0
    valid: List[Dict[str, float]] = field(default_factory=list)  # {"iteration", "lm_loss", "ppl"}
    exit_reason: str = "train_iters"
    optimizer_state_bytes: int = 0  # this rank's Adam moments (+ fp32 masters when they are copies)
    # Seconds per iteration over the last log window: time_forward_backward_s (compute), time_pipeline_wait_s
    # (blocked in pipeline transfers: the bubble), time_dp_comm_s (gradient reductions not hidden by
    # overlap), time_optimizer_s (clip, step, ZeRO-1 gather). Also on every metrics line.
    step_time_breakdown: Dict[str, float] = field(default_factory=dict)


def _print_rank0(pstate, *args):
    if pstate.rank == 0:
        print(*args, flush=True)


def _print_logging_rank(pstate, *args):
    if pstate.is_logging_rank:
        print(*args, flush=True)


# ---- setup ------------------------------------------------------------------------------------
ModelProvider = Callable[[Config, object], List[torch.nn.Module]]
DatasetsProvider = Callable[[Config, object, Sequence[int]], tuple]


def dataset_sample_counts(cfg: Config) -> List[int]:
    """Megatron's sizes: train iters x gbs; (iters // eval interval + 1) x eval iters x gbs; eval iters x gbs."""
    t = cfg.train
    gbs = t.global_batch_size
    return [t.train_iters * gbs, (t.train_iters // t.eval_interval + 1) * t.eval_iters * gbs, t.eval_iters * gbs]


def count_model_parameters(model_chunks, pstate) -> int:
    """Parameters of the whole model (duplicates over TP and the tied embedding counted once)."""
    local = sum(p.numel() for c in model_chunks for p in c.parameters() if not param_is_duplicate(p, pstate))
    total = torch.tensor([local], dtype=torch.float64, device=pstate.device)
    return int(model_parallel_all_reduce(total, pstate).item())


def rank_weight_memory(model_chunks, cfg: Config, pstate):
    """This rank's weight / gradient / optimizer bytes, from its parameters and gradient buffers."""
    params = [p for c in model_chunks for p in c.parameters() if p.requires_grad]
    buffers = [b for c in model_chunks for b in c.grad_buffers]
    return weight_memory(sum(p.numel() for p in params), params[0].element_size() if params else 4,
                         sum(b.numel for b in buffers), buffers[0].grad_data.element_size() if buffers else 4,
                         cfg.model.fp16 or cfg.model.bf16, pstate.dp_size, cfg.parallel.use_distributed_optimizer)


def build_training_optimizer(model_chunks, cfg: Config, pstate):
    """The run's optimizer: ZeRO-1 with --use-distributed-optimizer, else AdamW on whole tensors."""
    if cfg.parallel.use_distributed_optimizer:
        from megatron_lite.distributed.distrib_optimizer import DistributedOptimizer
        from megatron_lite.optim.grad_scaler import build_grad_scaler
        from megatron_lite.optim.optimizer import get_param_groups

        m = cfg.model
        mixed = m.fp16 or m.bf16
        return DistributedOptimizer(model_chunks, get_param_groups(model_chunks, cfg.optim.weight_decay), cfg.optim,
                                    pstate, build_grad_scaler(cfg.optim, fp16=m.fp16) if mixed else None, mixed,
                                    cfg.train.log_num_zeros_in_grad, cfg.parallel.overlap_param_gather)
    return build_optimizer(model_chunks, cfg.optim, cfg.model, pstate, log_num_zeros=cfg.train.log_num_zeros_in_grad)


def reported_loss(loss_dict: dict) -> torch.Tensor:
    """The loss a task's loss_func reports: its "lm loss" entry, else its first."""
    return loss_dict["lm loss"] if "lm loss" in loss_dict else next(iter(loss_dict.values()))


def _new_log_window() -> dict:
    """Counters over the iterations since the last training log line."""
    return {"loss_sum": 0.0, "iters": 0, "skipped": 0, "nan": 0}


class Trainer:
    """Holds the built pieces of one run; ``pretrain`` drives it."""

    def __init__(self, cfg: Config, pstate, datasets_provider: DatasetsProvider, model_provider: ModelProvider,
                 forward_step_func: Callable):
        from megatron_lite.data.tokenizer import build_tokenizer_from_config
        from megatron_lite.model.flops import num_floating_point_operations, recomputed_layer_count
        from megatron_lite.parallel.random import model_parallel_seed
        from megatron_lite.parallel.schedules import get_forward_backward_func

        self.cfg, self.pstate = cfg, pstate
        self.forward_step_func = forward_step_func
        m, t = cfg.model, cfg.train
        model_parallel_seed(t.seed, pstate)
        # --mock-data with --vocab-size and no tokenizer files reads none (the tokenizer module's rule).
        self.tokenizer = build_tokenizer_from_config(cfg.data, vocab_size=m.vocab_size)
        m.vocab_size = self.tokenizer.vocab_size
        m.padded_vocab_size = pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, pstate.tp_size)
        ddp_config = cfg.parallel.ddp_config()
        self.model = [DistributedDataParallel(chunk.to(pstate.device), pstate, ddp_config)
                      for chunk in model_provider(cfg, pstate)]
        self.num_params = count_model_parameters(self.model, pstate)
        _print_rank0(pstate, f"> layout TP={pstate.tp_size} PP={pstate.pp_size} DP={pstate.dp_size} "
                             f"({pstate.world_size} ranks, backend {pstate.backend}); vocab {m.vocab_size} "
                             f"padded to {m.padded_vocab_size}; {self.num_params:,} parameters")
        self.optimizer = build_training_optimizer(self.model, cfg, pstate)
        _print_rank0(pstate, f"> optimizer: {self.optimizer.implementation}; "
                             f"{describe_buckets(self.model, ddp_config)}")
        _print_rank0(pstate, format_weight_memory(rank_weight_memory(self.model, cfg, pstate)))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.optim, t.train_iters)
        self.forward_backward = get_forward_backward_func(cfg)
        self.num_microbatches = t.num_microbatches(pstate.dp_size)
        # Model FLOPs (MFU, as Megatron-LM reports it) and what the hardware runs with recompute (HFU).
        self.flops_per_batch = num_floating_point_operations(m, t.global_batch_size, recomputed_layers=0)
        self.hardware_flops_per_batch = num_floating_point_operations(m, t.global_batch_size,
                                                                      recomputed_layer_count(cfg))
        self.iteration, self.consumed_samples, self.consumed_valid_samples = 0, 0, 0
        self.heartbeat = Heartbeat(pstate, cfg.parallel.distributed_timeout_minutes)
        if t.load:
            self._load()
        self.train_ds, self.valid_ds, self.test_ds = datasets_provider(cfg, self.tokenizer,
                                                                       dataset_sample_counts(cfg))
        self.writer = MetricsWriter(t.metrics_jsonl, t.tensorboard_dir) if pstate.is_logging_rank else None
        dtype = "bf16" if m.bf16 else "fp16" if m.fp16 else "fp32"
        self.peak_tflops, peak_source = resolve_peak_tflops(t.peak_tflops, pstate.device, dtype)
        if t.peak_tflops:
            _print_logging_rank(pstate, f"> MFU against --peak-tflops {t.peak_tflops:g} TFLOP/s per device")
        elif self.peak_tflops:
            _print_logging_rank(pstate, f"> MFU against {self.peak_tflops:g} TFLOP/s per device ({peak_source})")
        elif pstate.device.type == "cuda":
            _print_logging_rank(pstate, f"> warning: {peak_source}; MFU is not reported (pass --peak-tflops)")
        self.step_timers = StepTimers()  # the step-time breakdown on each log line

    # ---- checkpoints ------------------------------------------------------------------------
    def _load(self) -> None:
        from megatron_lite.training.checkpoint import load_checkpoint, read_latest_iteration

        t = self.cfg.train
        if read_latest_iteration(t.load) is None:
            _print_rank0(self.pstate, f"> --load {t.load}: no checkpoint there; training from scratch")
            return
        load_optim = not (t.no_load_optim or t.finetune)
        started = time.time()
        info = load_checkpoint(t.load, self.model, self.optimizer, self.lr_scheduler, self.pstate,
                               load_optim=load_optim, load_rng=not (t.no_load_rng or t.finetune),
                               expected_config=self.cfg.to_dict())
        for message in info.get("messages", []):
            _print_rank0(self.pstate, message)
        if not info["optimizer_loaded"]:
            # Only then are the model's weights the best copy: loaded fp32 masters are exact, and
            # rebuilding them from half-precision weights would round them (as Megatron-LM).
            self.optimizer.reload_model_params()
        if t.finetune:
            _print_rank0(self.pstate, f"> --finetune: loaded the weights of {t.load}; starting at iteration 0")
            return
        self.iteration, self.consumed_samples = info["iteration"], info["consumed_train_samples"]
        _print_rank0(self.pstate, f"> loaded checkpoint from {t.load} at iteration {self.iteration} "
                                  f"({time.time() - started:.2f} s)")

    def save(self) -> None:
        from megatron_lite.training.checkpoint import save_checkpoint

        started = time.time()
        try:
            with self.heartbeat.phase("checkpoint save"):
                path = save_checkpoint(self.cfg.train.save, self.iteration, self.model, self.optimizer,
                                       self.lr_scheduler, self.consumed_samples, self.cfg.to_dict(), self.pstate)
        except OSError as e:  # validate() probed --save, but a disk can fill up or a mount go away
            where = e.filename or self.cfg.train.save
            raise OutputPathError(f"--save: cannot write the checkpoint of iteration {self.iteration} to "
                                  f"{where} ({e.strerror or e})") from None
        iter_dir = os.path.dirname(os.path.dirname(path))
        _print_rank0(self.pstate, f"> saved checkpoint at iteration {self.iteration} to {iter_dir} "
                                  f"({time.time() - started:.2f} s)")

    # ---- one iteration ----------------------------------------------------------------------
    def _run_schedule(self, dataset, consumed: int, forward_only: bool, split: str, stats=None) -> List[dict]:
        m, t = self.cfg.model, self.cfg.train
        it = build_data_iterators(dataset, consumed, t.micro_batch_size, self.num_microbatches, self.pstate,
                                  self.tokenizer.eod, m, num_chunks=len(self.model), split=split)
        return self.forward_backward(
            forward_step_func=self.forward_step_func, data_iterator=it, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=m.seq_length, micro_batch_size=t.micro_batch_size,
            hidden_size=m.hidden_size, pstate=self.pstate, forward_only=forward_only,
            grad_scale=None if forward_only else self.optimizer.get_loss_scale(), dtype=m.params_dtype,
            sequence_parallel=m.sequence_parallel, stats=stats)

    def _reduce_loss(self, loss_dicts: List[dict]) -> Optional[float]:
        """Mean over micro-batches, then over DP replicas (with --calculate-per-token-loss: over the
        global batch's loss tokens); None off the last pipeline stage."""
        if self.cfg.train.calculate_per_token_loss:
            return reduce_token_loss(loss_dicts, self.pstate)
        if not self.pstate.is_pipeline_last_stage():
            return None
        value = torch.stack([reported_loss(d).float() for d in loss_dicts]).mean().reshape(1)
        if self.pstate.dp_size > 1:
            dist.all_reduce(value, group=self.pstate.dp_group)
            value /= self.pstate.dp_size
        return float(value.item())

    def train_step(self):
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        self.heartbeat.beat(self.iteration + 1)
        timers = self.step_timers
        # The breakdown synchronises the device around each phase: on a GPU, only the last step of
        # each log interval pays for that (on a CPU there is nothing to wait for: every step).
        timed = self.pstate.device.type != "cuda" or (self.iteration + 1) % self.cfg.train.log_interval == 0
        timers.begin_step(timed)
        stats = ScheduleStats(enabled=False)  # only its time blocked in pipeline transfers is read
        stats.time_transfers = timed
        with self.heartbeat.phase("forward-backward schedule"), timers.phase("forward_backward"):
            loss_dicts = self._run_schedule(self.train_ds, self.consumed_samples, False, "train", stats)
        timers.move(stats.p2p_seconds, "forward_backward", "pipeline_wait")  # the bubble, and transfers
        with self.heartbeat.phase("gradient reduction"), timers.phase("dp_comm"):
            finalize_model_grads(self.model, self.pstate)
            if self.cfg.train.calculate_per_token_loss:
                scale_to_token_mean(self.model, loss_dicts, self.num_microbatches, self.pstate)
        with self.heartbeat.phase("optimizer step"), timers.phase("optimizer"):
            ok, grad_norm, num_zeros = self.optimizer.step()
        if ok:
            self.lr_scheduler.step(1)
        self.iteration += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        return self._reduce_loss(loss_dicts), ok, grad_norm, num_zeros, lr

    @torch.no_grad()
    def evaluate(self, dataset, split: str) -> Optional[float]:
        for chunk in self.model:
            chunk.eval()
        t = self.cfg.train
        losses, token_sums = [], None
        for i in range(t.eval_iters):
            consumed = self.consumed_valid_samples if split == "valid" else i * t.global_batch_size
            loss_dicts = self._run_schedule(dataset, consumed, True, split)
            if t.calculate_per_token_loss:  # one token mean over every evaluated batch, not a mean of means
                sums = token_loss_sums(loss_dicts, self.pstate)
                token_sums = sums if token_sums is None else token_sums + sums
            else:
                losses.append(self._reduce_loss(loss_dicts))
            if split == "valid":
                self.consumed_valid_samples += t.global_batch_size
        for chunk in self.model:
            chunk.train()
        if t.calculate_per_token_loss:
            return token_mean(token_sums)
        return None if losses[0] is None else sum(losses) / len(losses)

    # ---- the loop ---------------------------------------------------------------------------
    def _step_time_spread(self, iter_time_s: float) -> dict:
        """Min / max of the per-iteration time over all ranks, and the slowest rank: a slow node shows."""
        if self.pstate.world_size == 1 or not dist.is_initialized():
            return {}
        both = torch.zeros(2, self.pstate.world_size, dtype=torch.float64, device=self.pstate.device)
        both[0, self.pstate.rank] = iter_time_s
        both[1, self.pstate.rank] = peak_memory_bytes(self.pstate.device)  # the benchmark's max over ranks
        dist.all_reduce(both)
        times, memory = both[0], both[1]
        return {"iter_time_min_s": float(times.min()), "iter_time_max_s": float(times.max()),
                "slowest_rank": int(times.argmax()), "mem_peak_max_over_ranks_gib": float(memory.max()) / 2 ** 30}

    def _log_training(self, window: dict, iter_time_s: float, lr: float, grad_norm, num_zeros, skipped: bool,
                      spread: Optional[dict] = None):
        t, m = self.cfg.train, self.cfg.model
        counted = window["iters"] - window["skipped"] - window["nan"]
        lm_loss = window["loss_sum"] / counted if counted > 0 else None
        rec = {"iteration": self.iteration, "consumed_samples": self.consumed_samples, "lm_loss": lm_loss,
               "lr": lr, "grad_norm": grad_norm, "loss_scale": self.optimizer.get_loss_scale(),
               "skipped_iter": int(skipped), "iter_time_s": iter_time_s,
               **throughput(iter_time_s, t.global_batch_size, m.seq_length, self.flops_per_batch,
                            self.pstate.world_size, self.peak_tflops, self.hardware_flops_per_batch),
               "peak_tflops": self.peak_tflops,
               "global_batch_size": t.global_batch_size, "num_zeros": num_zeros,
               "skipped_iters": window["skipped"], "nan_iters": window["nan"], **(spread or {}),
               **memory_stats(self.pstate.device)}
        print(format_train_line(rec, t.train_iters), flush=True)
        if self.writer is not None:
            self.writer.write(rec)

    def _evaluate_and_log(self, dataset, split: str, summary: TrainSummary) -> None:
        with self.heartbeat.phase(f"{split} evaluation"):
            loss = self.evaluate(dataset, split)  # every rank runs the schedule; the last stage has the loss
        if loss is not None and self.pstate.is_logging_rank:
            self._log_eval(loss, split, summary)

    def _log_eval(self, loss: float, split: str, summary: TrainSummary) -> None:
        ppl = perplexity(loss)
        summary.valid.append({"iteration": self.iteration, "split": split, "lm_loss": loss, "ppl": ppl})
        print(format_eval_line(self.iteration, loss, ppl, "validation" if split == "valid" else split), flush=True)
        if self.writer is not None:
            self.writer.write({"iteration": self.iteration, "split": split, "consumed_samples": self.consumed_samples,
                               "lm_loss": loss, "ppl": ppl}, tb_prefix=f"{split}/")

    def _install_signal_handler(self) -> None:
        """SIGTERM only sets a flag: the loop sees it after the iteration, when every rank agrees."""
        import signal

        self._signal_received = False

        def handler(signum, frame):
            self._signal_received = True

        if self.cfg.train.exit_signal_handler:
            signal.signal(signal.SIGTERM, handler)

    def _should_exit_for_signal(self) -> bool:
        if not self.cfg.train.exit_signal_handler:
            return False
        flag = torch.tensor([int(self._signal_received)], device=self.pstate.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a rank that got no signal stops with the rest
        return bool(flag.item())

    def _should_exit_for_time(self, start: float) -> bool:
        """Every rank must agree, or some would wait forever in the next collective."""
        minutes = self.cfg.train.exit_duration_in_mins
        if minutes is None:
            return False
        flag = torch.tensor([int((time.time() - start) / 60.0 > minutes)], device=self.pstate.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> TrainSummary:
        t, ps = self.cfg.train, self.pstate
        summary = TrainSummary()
        start = time.time()
        timer = Timer()
        window = _new_log_window()
        saved_at = evaluated_at = None
        self._install_signal_handler()
        timer.start()
        while self.iteration < t.train_iters:
            loss, ok, grad_norm, num_zeros, lr = self.train_step()
            summary.losses.append(loss)
            summary.grad_norms.append(grad_norm)
            summary.lrs.append(lr)
            summary.skipped_iters += int(not ok)
            window["iters"] += 1
            if not ok:
                window["skipped"] += 1
            elif loss is not None and not math.isfinite(loss):
                window["nan"] += 1
            elif loss is not None:
                window["loss_sum"] += loss

            if self.iteration % t.log_interval == 0:
                timer.stop()
                iter_time = timer.reset() / window["iters"]
                spread = self._step_time_spread(iter_time)  # every rank takes part
                spread.update(self.step_timers.averages())
                summary.step_time_breakdown = {k: v for k, v in spread.items() if k.startswith("time_")}
                if ps.is_logging_rank:
                    self._log_training(window, iter_time, lr, grad_norm, num_zeros, not ok, spread)
                window = _new_log_window()
                timer.start()
            if self.valid_ds is not None and self.iteration % t.eval_interval == 0:
                timer.stop()  # evaluation and saving are not training time (as in Megatron-LM)
                self._evaluate_and_log(self.valid_ds, "valid", summary)
                evaluated_at = self.iteration
                timer.start()
            if t.save and t.save_interval and self.iteration % t.save_interval == 0:
                timer.stop()
                self.save()
                saved_at = self.iteration
                timer.start()
            if t.exit_interval and self.iteration % t.exit_interval == 0:
                summary.exit_reason = "exit_interval"
                break
            if self._should_exit_for_signal():
                summary.exit_reason = "signal"
                _print_rank0(ps, f"> SIGTERM received: saving at iteration {self.iteration} and exiting "
                                 "(--exit-signal-handler)")
                break
            if self._should_exit_for_time(start):
                summary.exit_reason = "exit_duration"
                _print_rank0(ps, f"> exiting after {t.exit_duration_in_mins} minutes (--exit-duration-in-mins)")
                break
        timer.stop()

        preempted = summary.exit_reason == "signal"  # save first, skip the rest: the job may be killed soon
        if self.valid_ds is not None and evaluated_at != self.iteration and self.iteration > 0 and not preempted:
            self._evaluate_and_log(self.valid_ds, "valid", summary)
        if self.test_ds is not None and summary.exit_reason == "train_iters":
            self._evaluate_and_log(self.test_ds, "test", summary)
        if t.save and saved_at != self.iteration and self.iteration > 0:
            self.save()
        summary.iteration, summary.consumed_samples = self.iteration, self.consumed_samples
        summary.optimizer_state_bytes = self.optimizer.state_bytes()
        _print_rank0(ps, f"> optimizer state on rank 0: {summary.optimizer_state_bytes:,} bytes (measured)")
        for chunk in self.model:
            chunk.finish_param_sync()  # the caller may read the weights
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pretrain(cfg: Config, datasets_provider: DatasetsProvider, model_provider: ModelProvider,
             forward_step_func: Callable, world_size: Optional[int] = None,
             after_training: Optional[Callable] = None) -> TrainSummary:
    """Validate, build the layout and the run, train; returns the summary. Leaves the process group up
    (the caller may run another layout in the same processes; the entry point tears it down).
    ``after_training(trainer, summary)`` runs on every rank with the trained model (a task's own
    evaluation, e.g. classification accuracy)."""
    from megatron_lite.parallel.state import initialize_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    validate(cfg, world_size)  # before any process group: a bad flag fails fast on every rank
    par = cfg.parallel
    pstate = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                 backend=par.distributed_backend, virtual_pipeline=cfg.virtual_pipeline_size(),
                                 timeout_minutes=par.distributed_timeout_minutes)
    trainer = Trainer(cfg, pstate, datasets_provider, model_provider, forward_step_func)
    try:
        summary = trainer.train()
        if after_training is not None and summary.exit_reason != "signal":  # preempted: leave soon
            with trainer.heartbeat.phase("evaluation after training"):
                after_training(trainer, summary)
        return summary
    except Exception as e:  # noqa: BLE001 - only a timeout is turned into a better message
        if is_peer_lost(e) and "timed out" in f"{e} {e.__cause__}".lower():
            # Say where this rank waited and which rank stopped answering, not just "timed out".
            raise RankStalledError(trainer.heartbeat.describe_stall(),
                                   timeout_s=60.0 * trainer.heartbeat.timeout_minutes) from None
        raise
    finally:
        trainer.close()
