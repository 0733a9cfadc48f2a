"""Configuration, declared once: the dataclasses of each part (ModelConfig, DataConfig,
TrainConfig), mirrored key for key by config.yaml. Unknown keys are errors; presets and --set
overrides apply on top. Standard library and PyYAML only: loading a config needs no torch (the
data machine reads it too).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


@dataclass
class ModelConfig:
    d_model: int = 192
    n_layers: int = 6
    n_heads: int = 4
    q_lora_rank: int = 0               # 0: full-rank query projection (as DeepSeek-V2-Lite)
    kv_lora_rank: int = 96
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    ffn_hidden: int = 512
    # L: sliding window; S: sparse global (whole-document reach at near-local cost); G: dense
    # global (O(n^2)); the pattern repeats over n_layers
    layer_pattern: str = "LLS"
    window: int = 64                   # sliding-window reach in positions (L and S layers)
    sparse_block: int = 64             # S layers: positions per compressed / selectable block
    sparse_topk: int = 16              # S layers: key blocks each query block reads at full resolution
    # S layers: elements (fp32: 4 bytes) a tile of the block ranking or of the gathered keys may
    # hold; smaller: less transient memory, more kernel calls on long documents
    sparse_chunk: int = 1 << 24
    # S layers: the most pooled keys a query reads; a document of more blocks is pooled in units
    # of 2, 4, 8... blocks, and each query block ranks the units, then the top units' blocks
    sparse_compressed_keys: int = 256
    causal: bool = False               # the autoencoder attends both ways
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    frames_per_position: int = 4       # 100 mel frames/s -> 25 positions/s
    vocab_size: int = 260
    n_speakers: int = 64
    activation_checkpointing: bool = False
    offload_checkpoints: bool = False  # the checkpoints (each block's input) kept in host memory until backward (CUDA)
    # Mini-sequence (MsT): each block's feed-forward runs over chunks of this many positions at a
    # time, a chunk's inner activations recomputed in backward; exact; 0: the whole row at once
    ffn_chunk: int = 0
    # the objective: what fraction of each modality is hidden
    text_mask_ratio: float = 0.3
    text_span: int = 3
    audio_mask_ratio: float = 0.3
    audio_span: int = 4
    speaker_drop: float = 0.3
    sentiment_drop: float = 0.3
    document_drop: float = 0.5         # every speaker and sentiment slot of a document hidden at once
    speaker_embedding_dim: int = 0     # size of external speaker vectors in the data; 0: none
    # the total loss is the weighted sum of the per-modality losses
    weight_text: float = 1.0
    weight_mel: float = 1.0
    weight_f0: float = 1.0
    weight_voicing: float = 1.0
    weight_energy: float = 1.0
    weight_speaker: float = 1.0
    weight_speaker_embedding: float = 1.0
    weight_sentiment: float = 1.0

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "ffn_hidden", "window", "sparse_block", "sparse_topk", "sparse_chunk",
                     "sparse_compressed_keys", "frames_per_position", "vocab_size", "n_speakers",
                     "text_span", "audio_span"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1")
        for name in ("q_lora_rank", "speaker_embedding_dim", "ffn_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0")
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "S", "G"}:
            raise ValueError(f"model.layer_pattern {self.layer_pattern!r}: use the letters L, S and G")
        if self.qk_rope_head_dim % 2:
            raise ValueError("model.qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.offload_checkpoints and not self.activation_checkpointing:
            raise ValueError("model.offload_checkpoints keeps activation checkpoints in host memory: it needs "
                             "model.activation_checkpointing=true")
        for name in ("text_mask_ratio", "audio_mask_ratio", "speaker_drop", "sentiment_drop", "document_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model.{name} must lie in [0, 1]")

    def layer_kind(self, layer: int) -> str:
        """L, S or G."""
        return self.layer_pattern[layer % len(self.layer_pattern)]


@dataclass
class DataConfig:
    batch_size: int = 4          # sequences per batch (rank_shares=auto: the most, fewer where memory is short)
    max_seq_len: int = 768       # positions per sequence
    shuffle: bool = True         # endpoints per epoch, then sequences within a window
    shuffle_window: int = 16     # batches whose sequences are shuffled together
    seed: int = 0
    num_workers: int = 0         # DataLoader workers, each with its own Flight client
    max_retries: int = 8         # Flight failures in a row before the run stops with an error (~1.5 min of waits)
    retry_backoff_s: float = 0.5  # first wait after a failure; doubles each time, at most 30 s
    read_timeout_s: float = 120.0  # a Flight call still running after this is cancelled and retried
    prefetch: int = 4            # batches read ahead in a background thread (0: none)

    def __post_init__(self):
        for name in ("batch_size", "max_seq_len", "shuffle_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1")
        if min(self.num_workers, self.prefetch, self.max_retries) < 0:
            raise ValueError("data.num_workers, data.prefetch and data.max_retries must be >= 0")
        if self.retry_backoff_s < 0 or self.read_timeout_s <= 0:
            raise ValueError("data.retry_backoff_s must be >= 0 and data.read_timeout_s > 0")


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 2e-3
    min_lr_ratio: float = 0.1        # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    precision: str = "auto"          # auto | fp32 | fp16 | bf16
    # torch CPU threads per process. 0: OMP_NUM_THREADS where set, else one per process when
    # several share a CPU under torchrun (threads of several processes spin against each other),
    # else torch's default (every core).
    cpu_threads: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3          # newest ckpt-*.pt kept; best.pt (lowest eval loss) is apart
    eval_every: int = 100              # steps between evaluations on --eval-files (and at the end)
    max_nonfinite_steps: int = 5     # this many skipped (NaN/inf) steps in a row stop the run
    # Positions (text tokens and stacked audio frames) per optimizer step over all ranks; batches
    # are accumulated to reach it. 0: one batch per rank and step.
    tokens_per_step: int = 0
    parallel: str = "ddp"            # under torchrun: ddp (replicas) | fsdp (FSDP2: weights sharded)
    # Work per process under torchrun, one whole number each (e.g. [3, 3, 1, 1, 1, 1, 1, 1] for two
    # fast and six slow cards): a process with share k accumulates k times the batches of share 1
    # and reads that share of the data. Empty: equal; "auto": measured at start (DDP). Losses
    # average over the whole step exactly either way. With context_parallel > 1 a share is the
    # length of the process's slice of its group's sequences ("auto": in proportion to each
    # card's speed on a slice, and its free memory, measured at start; kept for the run).
    rank_shares: list | str = dataclasses.field(default_factory=list)
    # With rank_shares=auto: every this many steps the processes compare their measured compute
    # (waits for each other left out) and, where a new plan evens it out by 10% or more, take it
    # from the next epoch on (an epoch's data is dealt when it starts). 0: never.
    rebalance_every: int = 200
    # Gradients sent between DDP processes: none | fp16 | bf16 (half the bytes) | powersgd (low
    # rank, for links of a few hundred MB/s); torch.distributed's communication hooks.
    grad_compression: str = "none"
    # Context parallelism: this many consecutive processes under torchrun share each sequence,
    # each running the blocks on a slice of it (attention reaches across the slices); the groups
    # are data-parallel to each other. 1: every process its own sequences.
    context_parallel: int = 1
    # A checkpoint that cannot be written (a full disk): stop (keeping the last good one), or go on
    # training and try again at the next interval. The last checkpoint of a run always stops.
    on_checkpoint_error: str = "stop"   # stop | continue
    # torch.compile each block: off by default, since it was slower where measured (CPU: 0.28x
    # with recompilation as packed lengths vary; see BENCHMARKS.md); needs Triton (sm_70+) on GPUs.
    compile: bool = False

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("train.lr must be > 0, train.min_lr_ratio in [0, 1], train.warmup_steps >= 0")
        if self.cpu_threads < 0:
            raise ValueError("train.cpu_threads must be >= 0 (0: chosen for the machine)")
        if self.rebalance_every < 0:
            raise ValueError("train.rebalance_every must be >= 0 (0: never)")
        if self.tokens_per_step < 0:
            raise ValueError("train.tokens_per_step must be >= 0 (0: one batch per step)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel={self.parallel!r}: use ddp or fsdp")
        if self.rank_shares != "auto" and (not isinstance(self.rank_shares, list)
                                           or not all(type(x) is int and x >= 1 for x in self.rank_shares)):
            raise ValueError(f"train.rank_shares={self.rank_shares!r}: auto, or whole numbers >= 1, one per process")
        if self.rank_shares == "auto" and self.parallel == "fsdp":
            raise ValueError("train.rank_shares=auto measures each process alone, which FSDP's collective forward "
                             "does not allow: give the shares by hand with train.parallel=fsdp")
        if self.context_parallel < 1:
            raise ValueError("train.context_parallel must be at least 1 (1: off)")
        if self.context_parallel > 1 and self.parallel == "fsdp":
            raise ValueError("train.context_parallel works with train.parallel=ddp so far")
        if self.grad_compression not in ("none", "fp16", "bf16", "powersgd"):
            raise ValueError(f"train.grad_compression={self.grad_compression!r}: use none, fp16, bf16 or powersgd")
        if self.on_checkpoint_error not in ("stop", "continue"):
            raise ValueError(f"train.on_checkpoint_error={self.on_checkpoint_error!r}: use stop or continue")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The model keys that make the weights what they are: a run resumed with another value of one of
# them cannot continue its checkpoint (the others, masking and loss weights, may change).
ARCHITECTURE = ("d_model", "n_layers", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "ffn_hidden", "layer_pattern", "window", "sparse_block", "sparse_topk", "causal",
                "rope_theta", "frames_per_position", "vocab_size", "n_speakers", "speaker_embedding_dim")


def architecture_changes(saved: dict, model: ModelConfig) -> list[str]:
    """The architecture keys whose value in a checkpoint's model config (`saved`) differs from
    this run's, as `--set` overrides that would restore them (keys the checkpoint predates are
    left out)."""
    return [f"model.{key}={saved[key]}" for key in ARCHITECTURE
            if key in saved and saved[key] != getattr(model, key)]


def _coerce(value, kind, key: str):
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, str) and type(value) is not kind:
        raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _sections() -> dict[str, type]:
    return {section.name: section.default_factory().__class__ for section in dataclasses.fields(Config)}


def _unknown(kind: str, name: str, known) -> ValueError:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(known))})"
    return ValueError(f"unknown config {kind} {name}{hint}")


def _field_kind(section: str, key: str) -> type:
    """The declared type of section.key; an unknown section or key is an error that suggests the
    nearest known one."""
    sections = _sections()
    if section not in sections:
        raise _unknown("section", section, sections)
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        raise _unknown("key", f"{section}.{key}", [f"{section}.{name}" for name in hints])
    return hints[key]


def build_config(raw: dict, where=lambda *path: "") -> Config:
    """Nested dict (config.yaml's shape) -> Config. An unknown section or key, or a value of the
    wrong type, is an error prefixed by where(*path) (a file's name and line)."""
    sections = _sections()
    values: dict[str, dict] = {name: {} for name in sections}
    for section, entries in raw.items():
        if section not in sections:
            raise ValueError(f"{where(section)}{_unknown('section', section, sections)}")
        if entries is not None and not isinstance(entries, dict):
            raise ValueError(f"{where(section)}{section} is not a config section (a mapping of keys)")
        for key, value in (entries or {}).items():
            try:
                values[section][key] = _coerce(value, _field_kind(section, key), f"{section}.{key}")
            except ValueError as err:
                raise ValueError(f"{where(section, key)}{err}") from None
    return Config(**{name: cls(**values[name]) for name, cls in sections.items()})


def _line_in(text: str, path: tuple[str, ...]) -> int | None:
    """The line of `path`'s last key in a YAML text, or None."""
    node, line = yaml.compose(text), None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            return line
        for key_node, value_node in node.value:
            if key_node.value == key:
                node, line = value_node, key_node.start_mark.line + 1
                break
        else:
            return line
    return line


def load_config(path: str | None, overrides: list[str], preset: str | None = None) -> Config:
    """config.yaml, then the named preset over it, then --set overrides. Errors name the file and
    line, or the --set, that caused them."""
    raw, text = {}, ""
    if path:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections")

    def in_file(*keys):
        line = _line_in(text, keys) if keys else None
        return f"{path}:{line}: " if line else f"{path}: "

    presets = raw.pop("presets", None) or {}
    build_config(raw, in_file)   # the file's own keys and values, each error at its line
    for name, sections in presets.items():
        build_config(sections or {}, lambda *keys, name=name: in_file("presets", name, *keys))
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"--preset {preset!r}: {path or 'no config'} defines "
                             f"{', '.join(presets) or 'no presets'}")
        for section, values in presets[preset].items():
            raw[section] = {**(raw.get(section) or {}), **values}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: use section.key=value, e.g. train.steps=100")
        try:
            raw.setdefault(section, {})[name] = _coerce(yaml.safe_load(value), _field_kind(section, name), key)
        except ValueError as err:
            raise ValueError(f"--set {item}: {err}") from None
    return build_config(raw)
