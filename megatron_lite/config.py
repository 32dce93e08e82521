"""Typed configuration built from Megatron-LM-spelled command-line flags.

Each dataclass field is named exactly as the argparse dest of its flag
(``--tensor-model-parallel-size`` -> ``tensor_model_parallel_size``; the flags are defined in
``megatron_lite.arguments``, re-exported here as ``build_parser``), so ``from_namespace``
fills them by name. Each section checks itself (``check``); a rule that spans sections calls
the function that owns it (the layout rules in ``parallel/layout.py``, the micro-batch rule of
the schedules, the tokenizer's file needs, the data specs); ``preflight`` is the one step that
looks at the filesystem. ``validate`` runs all of them, before any process group exists, and
raises one ``ConfigError`` naming the flags and what to do. Configs are plain data (``asdict``)
so checkpoints can store them.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from megatron_lite.arguments import build_parser
from megatron_lite.errors import ConfigError, UserError


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _at_least(minimum: int, *named) -> None:
    for name, val in named:
        need(val >= minimum, f"{name} must be >= {minimum}, got {val}")


def _as_config_error(rule, *args, **kwargs):
    """Run another module's rule; its UserError becomes the ConfigError that validate() raises."""
    try:
        return rule(*args, **kwargs)
    except ConfigError:
        raise
    except UserError as e:
        raise ConfigError(str(e)) from None


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
    openai_gelu: bool = False  # tanh-approximated GeLU (GPT-2's gelu_new); default exact erf GeLU
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

    def check(self, tp: int) -> None:
        """The model's own rules, and how its sizes must divide over ``tp`` ranks."""
        _at_least(1, ("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                  ("--num-attention-heads", self.num_attention_heads), ("--seq-length", self.seq_length))
        for name, val in (("--ffn-hidden-size", self.ffn_hidden_size),
                          ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by)):
            need(val is None or val >= 1, f"{name} must be >= 1, got {val}")
        need(self.init_method_std > 0,
             f"--init-method-std must be > 0 (the std of the normal weight init), got {self.init_method_std}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
             f"({self.num_attention_heads})")
        if self.position_embedding_type == "rope":
            head_dim = self.hidden_size // self.num_attention_heads
            need(head_dim % 2 == 0,
                 f"--position-embedding-type rope rotates pairs of channels, so the head dimension "
                 f"(--hidden-size {self.hidden_size} / --num-attention-heads {self.num_attention_heads} = "
                 f"{head_dim}) must be even; change --hidden-size or --num-attention-heads")
        need(self.num_attention_heads % tp == 0,
             f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
             f"--tensor-model-parallel-size ({tp})")
        need(self.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size ({self.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})")
        need(self.seq_length <= self.max_position_embeddings,
             f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings "
             f"({self.max_position_embeddings}); raise --max-position-embeddings or shorten --seq-length")
        need(not (self.fp16 and self.bf16), "--fp16 and --bf16 are exclusive; choose one")
        if self.sequence_parallel:
            need(self.seq_length % tp == 0,
                 f"--sequence-parallel needs --seq-length ({self.seq_length}) divisible by "
                 f"--tensor-model-parallel-size ({tp})")
            if tp == 1:
                self.sequence_parallel = False  # Megatron-LM also drops it at TP=1: nothing to shard
        if self.recompute_method is not None:
            need(self.recompute_granularity == "full", "--recompute-method needs --recompute-granularity full")
        if self.recompute_granularity == "full":
            need(self.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform|block")
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1
            need(self.recompute_num_layers >= 1, "--recompute-num-layers must be >= 1")


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
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None  # elements; default max(40M, 1M x DP) with overlap, else one bucket
    data_parallel_size: Optional[int] = None  # derived: world // (TP * PP)

    def check(self, world_size: int, num_layers: int) -> None:
        """The layout: sizes, backend, the pipeline split; fills data_parallel_size and the schedule."""
        from megatron_lite.parallel.layout import check_backend_device, check_pipeline_split, data_parallel_size

        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _at_least(1, ("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp))
        check_backend_device(self.distributed_backend)
        self.data_parallel_size = data_parallel_size(world_size, tp, pp)
        check_pipeline_split(num_layers, pp, self.decoder_first_pipeline_num_layers,
                             self.decoder_last_pipeline_num_layers, self.num_layers_per_virtual_pipeline_stage)
        interleaved = self.num_layers_per_virtual_pipeline_stage is not None
        if interleaved:
            need(self.pipeline_schedule in (None, "interleaved"),
                 "--num-layers-per-virtual-pipeline-stage runs the interleaved schedule; "
                 "drop --pipeline-schedule or set it to interleaved")
            self.pipeline_schedule = "interleaved"
        elif self.pipeline_schedule == "interleaved":
            raise ConfigError("--pipeline-schedule interleaved needs --pipeline-model-parallel-size > 1"
                              if pp == 1 else
                              "--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage")
        if self.pipeline_schedule is None:
            self.pipeline_schedule = "1f1b"
        need(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1,
             f"--ddp-bucket-size must be >= 1 (elements per gradient bucket), got {self.ddp_bucket_size}")
        need(not self.overlap_param_gather or self.use_distributed_optimizer,
             "--overlap-param-gather overlaps ZeRO-1's parameter all-gather with the next forward; "
             "it needs --use-distributed-optimizer")

    def ddp_config(self):
        from megatron_lite.distributed.data_parallel import DDPConfig

        return DDPConfig(overlap_grad_reduce=self.overlap_grad_reduce,
                         use_distributed_optimizer=self.use_distributed_optimizer,
                         overlap_param_gather=self.overlap_param_gather, bucket_size=self.ddp_bucket_size)


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

    def check(self, train_iters: int) -> None:
        need(self.lr_decay_iters is None or self.lr_decay_iters >= 1, "--lr-decay-iters must be >= 1")
        need(self.lr_warmup_fraction is None or self.lr_warmup_iters == 0,
             "--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
        need(self.lr >= 0, f"--lr must be >= 0, got {self.lr}")
        need(self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}")
        need(self.min_lr <= self.lr, f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        decay_iters = self.lr_decay_iters or train_iters
        need(self.lr_warmup_iters <= decay_iters,
             f"--lr-warmup-iters ({self.lr_warmup_iters}) exceeds the decay span (--lr-decay-iters, default "
             f"--train-iters: {decay_iters}); shorten the warmup")
        need(self.lr_warmup_iters >= 0, f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        need(self.lr_warmup_fraction is None or 0.0 <= self.lr_warmup_fraction <= 1.0,
             f"--lr-warmup-fraction must lie in [0, 1], got {self.lr_warmup_fraction}")
        need(self.clip_grad >= 0, f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")


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

    def check(self) -> None:
        """The specs parse (no file is opened here: that is ``preflight``)."""
        from megatron_lite.data.data_spec import parse_data_path, parse_split

        if not self.mock_data:
            need(bool(self.data_path), "--data-path is required (or --mock-data for random tokens)")
            _as_config_error(parse_data_path, self.data_path)
            _as_config_error(parse_split, self.split)  # the parser the datasets use

    def tokenizer_files(self, vocab_size: Optional[int]):
        """(flag, path) of the files the tokenizer will read (the tokenizer module's rule)."""
        from megatron_lite.data.tokenizer import required_tokenizer_files, tokenizer_args_from_config

        args = tokenizer_args_from_config(self, vocab_size)
        return _as_config_error(required_tokenizer_files, args["tokenizer_type"], args["vocab_file"],
                                args["merge_file"], args["tokenizer_model"], args["vocab_size"])

    def shard_prefixes(self) -> List[str]:
        from megatron_lite.data.data_spec import parse_data_path

        return [] if self.mock_data else parse_data_path(self.data_path)[1]


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
    finetune: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False  # on SIGTERM: finish the iteration, save, exit 0
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None
    peak_tflops: Optional[float] = None
    log_num_zeros_in_grad: bool = False
    calculate_per_token_loss: bool = False  # loss = sum / loss tokens of the global batch (training/token_loss.py)
    dry_run: bool = False

    def check(self, dp: int) -> None:
        _at_least(1, ("--micro-batch-size", self.micro_batch_size), ("--train-iters", self.train_iters))
        need(self.global_batch_size is None or self.global_batch_size >= 1,
             f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * dp
        need(self.global_batch_size % (self.micro_batch_size * dp) == 0,
             f"--global-batch-size ({self.global_batch_size}) must be divisible by --micro-batch-size "
             f"({self.micro_batch_size}) x data-parallel size ({dp}) = {self.micro_batch_size * dp}")
        need(self.log_interval >= 1, "--log-interval must be >= 1")
        need(self.eval_interval >= 1, "--eval-interval must be >= 1")
        need(self.eval_iters >= 0, f"--eval-iters must be >= 0 (0 disables evaluation), got {self.eval_iters}")
        if self.save_interval is not None:
            need(self.save is not None, "--save-interval needs --save DIR")

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)


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

    def virtual_pipeline_size(self) -> Optional[int]:
        """Model chunks per stage under interleaving (None without it)."""
        from megatron_lite.parallel.layout import virtual_pipeline_size

        return virtual_pipeline_size(self.model.num_layers, self.parallel.pipeline_model_parallel_size,
                                     self.parallel.num_layers_per_virtual_pipeline_stage)


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


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check every flag combination and the files they name; fill derived fields. Raises ConfigError."""
    from megatron_lite.parallel.schedule_orders import check_microbatches

    m, par, t = cfg.model, cfg.parallel, cfg.train
    cfg.parallel.check(world_size, m.num_layers)
    m.check(par.tensor_model_parallel_size)
    t.check(par.data_parallel_size)
    cfg.optim.check(t.train_iters)
    cfg.data.check()
    # The schedules' own micro-batch rule, on the numbers every rank will compute.
    _as_config_error(check_microbatches, t.num_microbatches(par.data_parallel_size),
                     par.pipeline_model_parallel_size, par.pipeline_schedule, cfg.virtual_pipeline_size() or 1)
    preflight(cfg)
    return cfg


def preflight(cfg: Config) -> None:
    """The one look at the filesystem: input files exist, output locations are writable."""
    from megatron_lite.data.data_spec import check_prefix_files

    for prefix in cfg.data.shard_prefixes():
        _as_config_error(check_prefix_files, prefix)
    for flag, path in cfg.data.tokenizer_files(cfg.model.vocab_size):
        need(os.path.isfile(path), f"{flag}: {path} does not exist or is not a file")
    t = cfg.train
    # Output locations: found unwritable here, not when the first checkpoint is saved hours in.
    for flag, directory in (("--save", t.save), ("--tensorboard-dir", t.tensorboard_dir)):
        if directory is not None:
            _check_output_dir(flag, directory, directory)
    if t.metrics_jsonl is not None:
        need(not os.path.isdir(t.metrics_jsonl),
             f"--metrics-jsonl: {t.metrics_jsonl} is a directory; give a file path")
        _check_output_dir("--metrics-jsonl", t.metrics_jsonl, os.path.dirname(os.path.abspath(t.metrics_jsonl)))


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
