"""Typed configuration built from Megatron-LM-spelled command-line flags.

Each dataclass field is named exactly as the argparse dest of its flag
(``--tensor-model-parallel-size`` -> ``tensor_model_parallel_size``; the flags are defined in
``megatron_lite.arguments``, re-exported here as ``build_parser``), so ``from_namespace``
fills them by name. ``validate`` checks every combination once, before any process group
exists, and raises ``ConfigError`` with one message naming the flags and what to do.
Configs are plain data (``asdict``) so checkpoints can store them.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from megatron_lite.arguments import build_parser


class ConfigError(ValueError):
    """A bad flag or flag combination. The message names the flags and the fix."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    num_attention_heads: int = 4
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # default seq_length
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope
    rotary_base: float = 10000.0
    vocab_size: Optional[int] = None  # unpadded; from the tokenizer unless given
    padded_vocab_size: Optional[int] = None  # filled by pad_vocab_size()
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = False
    attention_backend: str = "auto"  # auto | unfused | fused_softmax | sdpa
    masked_softmax_fusion: bool = True
    attention_softmax_in_fp32: bool = False  # Megatron-LM's default: softmax in the input dtype
    recompute_granularity: Optional[str] = None  # full | selective
    recompute_method: Optional[str] = None  # uniform | block
    recompute_num_layers: Optional[int] = None
    sequence_parallel: bool = False
    fp16: bool = False
    bf16: bool = False
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length

    @property
    def params_dtype(self):
        import torch
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    pipeline_schedule: Optional[str] = None  # gpipe | 1f1b | interleaved; default from the layout
    distributed_backend: Optional[str] = None  # nccl | gloo; default nccl with CUDA, else gloo
    distributed_timeout_minutes: float = 10.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    ddp_bucket_size: Optional[int] = None
    data_parallel_size: Optional[int] = None  # derived: world // (TP * PP)


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"  # constant | linear | cosine
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2


@dataclass
class DataConfig:
    data_path: Optional[List[str]] = None
    split: str = "969,30,1"
    data_cache_path: Optional[str] = None
    tokenizer_type: str = "GPT2BPETokenizer"
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    mock_data: bool = False


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default micro * DP
    train_iters: int = 100
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None
    peak_tflops: Optional[float] = None
    log_num_zeros_in_grad: bool = False
    dry_run: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of to_dict; keys this version does not know (from an older or newer run) are dropped."""
        return cls(**{name: _from_known_fields(section, d[name]) for name, section in _SECTIONS})


_SECTIONS = (("model", ModelConfig), ("parallel", ParallelConfig), ("optim", OptimizerConfig),
             ("data", DataConfig), ("train", TrainConfig))


def _from_known_fields(section_cls, values: dict):
    """``section_cls`` from the entries of ``values`` named like its fields; other entries are ignored."""
    return section_cls(**{f.name: values[f.name] for f in fields(section_cls) if f.name in values})


def from_namespace(ns: argparse.Namespace) -> Config:
    """Each section takes the flags whose dest is one of its fields."""
    return Config(**{name: _from_known_fields(section, vars(ns)) for name, section in _SECTIONS})


def parse_args(argv: Optional[List[str]] = None) -> Config:
    return from_namespace(build_parser().parse_args(argv))


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: up to a multiple of --make-vocab-size-divisible-by x TP."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def parse_data_path(data_path: Optional[List[str]]):
    """'PREFIX' or 'W1 P1 W2 P2 ...' -> (weights or None, prefixes)."""
    if not data_path:
        return None, []
    if len(data_path) == 1:
        return None, list(data_path)
    if len(data_path) % 2 != 0:
        raise ConfigError(f"--data-path: a weighted list must alternate WEIGHT PREFIX, got {data_path}")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ConfigError(f"--data-path: expected 'W1 PREFIX1 W2 PREFIX2 ...', got {data_path}") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--data-path: weights must be >= 0 and not all zero, got {weights}")
    return weights, list(data_path[1::2])


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check every flag combination; fill derived fields. Raises ConfigError."""
    m, par, o, d, t = cfg.model, cfg.parallel, cfg.optim, cfg.data, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for name, val in [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                      ("--num-attention-heads", m.num_attention_heads), ("--seq-length", m.seq_length),
                      ("--micro-batch-size", t.micro_batch_size), ("--train-iters", t.train_iters),
                      ("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)]:
        need(val >= 1, f"{name} must be >= 1, got {val}")
    for name, val in [("--ffn-hidden-size", m.ffn_hidden_size),
                      ("--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by),
                      ("--global-batch-size", t.global_batch_size)]:
        need(val is None or val >= 1, f"{name} must be >= 1, got {val}")
    need(m.init_method_std > 0,
         f"--init-method-std must be > 0 (the std of the normal weight init), got {m.init_method_std}")
    if par.distributed_backend == "nccl":
        import torch  # config stays importable without torch for the flag-only paths
        need(torch.cuda.is_available(),
             "--distributed-backend nccl needs CUDA, and no CUDA device is available; "
             "use --distributed-backend gloo (the default without CUDA)")
    need(world_size % (tp * pp) == 0,
         f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
         f"--pipeline-model-parallel-size ({pp}); launch a multiple of {tp * pp} processes")
    dp = world_size // (tp * pp)
    par.data_parallel_size = dp
    need(m.hidden_size % m.num_attention_heads == 0,
         f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads ({m.num_attention_heads})")
    if m.position_embedding_type == "rope":
        head_dim = m.hidden_size // m.num_attention_heads
        need(head_dim % 2 == 0,
             f"--position-embedding-type rope rotates pairs of channels, so the head dimension "
             f"(--hidden-size {m.hidden_size} / --num-attention-heads {m.num_attention_heads} = {head_dim}) "
             "must be even; change --hidden-size or --num-attention-heads")
    need(m.num_attention_heads % tp == 0,
         f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
         f"--tensor-model-parallel-size ({tp})")
    need(m.ffn_hidden_size % tp == 0,
         f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})")
    need(m.seq_length <= m.max_position_embeddings,
         f"--seq-length ({m.seq_length}) exceeds --max-position-embeddings ({m.max_position_embeddings}); "
         "raise --max-position-embeddings or shorten --seq-length")
    need(not (m.fp16 and m.bf16), "--fp16 and --bf16 are exclusive; choose one")
    if m.sequence_parallel:
        need(m.seq_length % tp == 0,
             f"--sequence-parallel needs --seq-length ({m.seq_length}) divisible by "
             f"--tensor-model-parallel-size ({tp})")
        if tp == 1:
            m.sequence_parallel = False  # Megatron-LM also drops it at TP=1: nothing to shard
    if m.recompute_method is not None:
        need(m.recompute_granularity == "full",
             "--recompute-method needs --recompute-granularity full")
    if m.recompute_granularity == "full":
        need(m.recompute_method is not None,
             "--recompute-granularity full needs --recompute-method uniform|block")
        if m.recompute_num_layers is None:
            m.recompute_num_layers = 1
        need(m.recompute_num_layers >= 1, "--recompute-num-layers must be >= 1")

    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"--global-batch-size ({t.global_batch_size}) must be divisible by --micro-batch-size "
         f"({t.micro_batch_size}) x data-parallel size ({dp}) = {t.micro_batch_size * dp}")

    # Pipeline layout.
    first, last = par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers
    if pp == 1:
        need(par.num_layers_per_virtual_pipeline_stage is None,
             "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        need(first is None and last is None,
             "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        need(par.pipeline_schedule in (None, "1f1b", "gpipe"),
             "--pipeline-schedule interleaved needs --pipeline-model-parallel-size > 1")
    else:
        middle_layers = m.num_layers - (first or 0) - (last or 0)
        middle_stages = pp - (first is not None) - (last is not None)
        need(middle_layers >= 0 and (middle_stages == 0 and middle_layers == 0 or
                                     middle_stages > 0 and middle_layers % middle_stages == 0),
             f"--num-layers ({m.num_layers}) cannot be split evenly over --pipeline-model-parallel-size "
             f"({pp}) stages" + (f" with --decoder-first-pipeline-num-layers {first}" if first else "")
             + (f" and --decoder-last-pipeline-num-layers {last}" if last else ""))
        vp = par.num_layers_per_virtual_pipeline_stage
        if vp is not None:
            need(first is None and last is None,
                 "--num-layers-per-virtual-pipeline-stage cannot be combined with uneven "
                 "--decoder-first/last-pipeline-num-layers")
            need(vp >= 1 and (m.num_layers // pp) % vp == 0,
                 f"--num-layers ({m.num_layers}) / --pipeline-model-parallel-size ({pp}) must be divisible by "
                 f"--num-layers-per-virtual-pipeline-stage ({vp})")
            need(vp >= 1 and (m.num_layers // pp) // vp >= 2,
                 f"--num-layers-per-virtual-pipeline-stage ({vp}) leaves one model chunk per stage "
                 f"({m.num_layers // pp} layers per stage): interleaving needs at least two; use a smaller "
                 "value, or drop the flag for plain 1F1B")
            need(par.pipeline_schedule in (None, "interleaved"),
                 "--num-layers-per-virtual-pipeline-stage runs the interleaved schedule; "
                 "drop --pipeline-schedule or set it to interleaved")
            par.pipeline_schedule = "interleaved"
            num_micro = t.global_batch_size // (t.micro_batch_size * dp)
            need(num_micro % pp == 0,
                 f"the interleaved schedule needs the number of micro-batches ({num_micro} = "
                 f"--global-batch-size / (--micro-batch-size x DP)) to be a multiple of "
                 f"--pipeline-model-parallel-size ({pp})")
        else:
            need(par.pipeline_schedule != "interleaved",
                 "--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage")
    if par.pipeline_schedule is None:
        par.pipeline_schedule = "1f1b"

    for flag, on in (("--use-distributed-optimizer", par.use_distributed_optimizer),
                     ("--overlap-grad-reduce", par.overlap_grad_reduce),
                     ("--ddp-bucket-size", par.ddp_bucket_size is not None)):
        need(not on, f"{flag} is not implemented yet (ZeRO-1 and bucketed, overlapped gradient reduction "
                     "are on the roadmap); drop the flag: data parallelism all-reduces gradients after backward")

    # Optimizer and schedule.
    need(o.lr_decay_iters is None or o.lr_decay_iters >= 1, "--lr-decay-iters must be >= 1")
    need(o.lr_warmup_fraction is None or o.lr_warmup_iters == 0,
         "--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
    need(o.lr >= 0, f"--lr must be >= 0, got {o.lr}")
    need(o.min_lr >= 0, f"--min-lr must be >= 0, got {o.min_lr}")
    need(o.min_lr <= o.lr, f"--min-lr ({o.min_lr}) must not exceed --lr ({o.lr})")
    decay_iters = o.lr_decay_iters or t.train_iters
    need(o.lr_warmup_iters <= decay_iters,
         f"--lr-warmup-iters ({o.lr_warmup_iters}) exceeds the decay span (--lr-decay-iters, default "
         f"--train-iters: {decay_iters}); shorten the warmup")
    need(o.lr_warmup_iters >= 0, f"--lr-warmup-iters must be >= 0, got {o.lr_warmup_iters}")
    need(o.lr_warmup_fraction is None or 0.0 <= o.lr_warmup_fraction <= 1.0,
         f"--lr-warmup-fraction must lie in [0, 1], got {o.lr_warmup_fraction}")
    need(o.clip_grad >= 0, f"--clip-grad must be >= 0 (0 disables clipping), got {o.clip_grad}")

    # Data and tokenizer files.
    if not d.mock_data:
        need(bool(d.data_path), "--data-path is required (or --mock-data for random tokens)")
        _, prefixes = parse_data_path(d.data_path)
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                need(os.path.isfile(prefix + ext),
                     f"--data-path: {prefix}{ext} does not exist; preprocess the corpus with "
                     "tools/preprocess_data.py or fix the prefix (no .bin/.idx suffix)")
        from megatron_lite.data.gpt_dataset import GPTDatasetError, parse_split  # numpy, not torch
        try:
            parse_split(d.split)  # the parser the datasets use, so both accept the same strings
        except GPTDatasetError as e:
            raise ConfigError(str(e)) from None
    if d.tokenizer_type == "GPT2BPETokenizer" and not (d.mock_data and m.vocab_size):
        for flag, path in (("--vocab-file", d.vocab_file), ("--merge-file", d.merge_file)):
            need(path is not None, f"{flag} is required with --tokenizer-type GPT2BPETokenizer")
            need(os.path.isfile(path), f"{flag}: {path} does not exist or is not a file")
    elif d.tokenizer_type == "HuggingFaceTokenizer":
        need(d.tokenizer_model is not None,
             "--tokenizer-model PATH (a tokenizer.json) is required with --tokenizer-type HuggingFaceTokenizer")
        need(os.path.isfile(d.tokenizer_model), f"--tokenizer-model: {d.tokenizer_model} does not exist")
    elif d.tokenizer_type == "NullTokenizer":
        need(m.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")

    need(t.log_interval >= 1, "--log-interval must be >= 1")
    need(t.eval_interval >= 1, "--eval-interval must be >= 1")
    need(t.eval_iters >= 0, f"--eval-iters must be >= 0 (0 disables evaluation), got {t.eval_iters}")
    if t.save_interval is not None:
        need(t.save is not None, "--save-interval needs --save DIR")
    # Output locations: found unwritable here, not when the first checkpoint is saved hours in.
    for flag, directory in (("--save", t.save), ("--tensorboard-dir", t.tensorboard_dir)):
        if directory is not None:
            _check_output_dir(flag, directory, directory)
    if t.metrics_jsonl is not None:
        need(not os.path.isdir(t.metrics_jsonl),
             f"--metrics-jsonl: {t.metrics_jsonl} is a directory; give a file path")
        _check_output_dir("--metrics-jsonl", t.metrics_jsonl,
                          os.path.dirname(os.path.abspath(t.metrics_jsonl)))
    return cfg


def _check_output_dir(flag: str, given: str, directory: str) -> None:
    """``directory`` must exist as a writable directory, or be creatable: its nearest existing
    ancestor is a writable directory. Writability is probed with a temporary file, because
    ``os.access`` says yes to root even where the filesystem refuses (read-only mounts, /proc)."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise ConfigError(f"{flag}: cannot write {given}: {path} exists and is not a directory; "
                          "choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".megatron_lite_write_probe_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write {given}: {path} is not writable ({e.strerror or e}); "
                          "choose a writable location") from None
