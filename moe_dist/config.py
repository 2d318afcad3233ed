"""Typed configuration: one small dataclass per component, loaded from YAML, overridden from the
command line with dotted keys (``--moe.top_k=2``), and checked in one place, :func:`validate`.

Configs hold plain values only (no process group, no device object): the runtime objects are built
from them after validation, so a bad config fails before any process group or tensor exists.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256            # F, hidden size of one routed expert
    activation: Literal["swiglu", "gelu"] = "swiglu"
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    # Softmax-then-topk (Switch/GShard/Mixtral) renormalises or not; sigmoid (DeepSeek-V3) usually does.
    renormalize: bool = False
    route_scale: float = 1.0            # DeepSeek-V3 multiplies the routed weights by a constant
    jitter_eps: float = 0.0             # multiplicative input jitter (Switch), training only
    num_groups: int = 1                 # group-limited routing: experts split into groups ...
    topk_groups: int = 1                # ... and each token may use this many groups
    expert_bias: bool = False           # DeepSeek-V3 auxiliary-loss-free balancing
    bias_update_rate: float = 1e-3
    force_balanced: bool = False        # debugging/benchmarks: round-robin routing, ignores the router
    aux_loss_coef: float = 0.01         # α of the load-balancing loss; 0 disables
    aux_loss_type: Literal["global", "seq"] = "global"   # batch-level (Switch) or sequence-level (DeepSeek)
    # Load-balancing statistics over one rank's micro-batch, or summed over every data-parallel rank
    # (Megatron's global-batch balance: the loss then equals one process on the whole global batch).
    balance_over: Literal["micro_batch", "global_batch"] = "micro_batch"
    z_loss_coef: float = 0.0            # ST-MoE router z-loss; 0 disables
    capacity_factor: Optional[float] = None   # None = dropless
    min_capacity: int = 4
    drop_policy: Literal["probs", "position"] = "probs"
    # GShard groups: capacity applies per group of T/G consecutive tokens. On N ranks every rank's tokens
    # already form a group; one process with capacity_groups=N reproduces an N-rank run exactly.
    capacity_groups: int = 1
    pad_to_capacity: bool = False
    num_shared_experts: int = 0         # DeepSeek: dense MLP(s) applied to every token
    shared_expert_hidden: Optional[int] = None  # default: num_shared_experts * expert_hidden
    # Qwen2-MoE: the shared expert's output is scaled per token by sigmoid(x · w_gate), w_gate a [D] vector.
    shared_expert_gate: bool = False
    backend: Literal["auto", "grouped_mm", "loop", "triton"] = "auto"


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None    # grouped-query attention (Mixtral: 8); None = n_heads
    max_seq_len: int = 256
    dense_hidden: int = 512             # hidden size of dense (non-MoE) MLPs
    moe_every: int = 1                  # layer i is MoE when (i - first_dense) % moe_every == moe_every - 1 ...
    first_dense: int = 0                # ... and i >= first_dense (DeepSeek keeps the first layers dense)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    head_dim: Optional[int] = None      # per-head size; None = dim // n_heads (Qwen3 sets it independently)
    qkv_bias: bool = False              # biases on the q, k, v projections (Qwen2-MoE)
    # RMSNorm on queries and keys before rotary: per head over head_dim (Qwen3-MoE) or over the whole
    # q / k projection (OLMoE).
    qk_norm: Literal["none", "per_head", "full"] = "none"


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    etp: int = 1
    world_size: Optional[int] = None    # when set, a launch with another world size is refused
    timeout_s: float = 300.0
    stall_warn_s: float = 60.0          # a collective with no progress this long is reported, every interval
    debug_sync: bool = False            # ranks compare (step, layer, split sizes) before each all-to-all
    pp: int = 1                         # pipeline stages (the slowest axis of both views)
    pp_virtual: int = 1                 # model chunks (virtual stages) per pp rank; > 1 only with interleaved
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    # Layers per virtual stage in model order: pp·pp_virtual entries summing to model.n_layers; null = an even
    # split with the extra layers on the middle stages (the first holds the embedding, the last the head).
    pp_layers: Optional[list[int]] = None


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8                 # sequences per micro-batch per data-parallel rank
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = 10
    out_dir: str = "runs/default"
    grad_accum_steps: int = 1           # micro-batches per optimizer step (global batch = this × batch_size × dp)
    # Recompute in backward instead of keeping activations: the experts' activation function only, the whole
    # MoE layer, or the whole block.
    recompute: Literal["none", "moe_act", "moe", "block"] = "none"
    # Native engine: shard the fp32 master weights and AdamW moments (ZeRO-1), and the gradients (ZeRO-2),
    # over the data-parallel group (dense parameters) and the expert-data-parallel group (experts).
    shard_optimizer: Literal["none", "states", "states+grads"] = "none"
    eval_every: int = 0                 # validation loss every N steps (0: only at the end)
    eval_batches: int = 8
    on_nonfinite: Literal["raise", "skip"] = "raise"   # a NaN/Inf loss stops the run, or the step is skipped
    engine: Literal["native", "deepspeed"] = "native"  # deepspeed: deepspeed.initialize with ZeRO
    zero_stage: int = 1                 # ZeRO stage for engine=deepspeed (0, 1 or 2)
    deepspeed_config: Optional[str] = None   # a DeepSpeed JSON whose keys override the generated ones
    tensorboard: bool = True            # TensorBoard scalars under out_dir/tb when tensorboard is installed
    wandb_project: Optional[str] = None  # Weights & Biases run in this project when wandb is installed


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: Optional[str] = None           # default: <train.out_dir>/checkpoints
    every: int = 0                      # save every N optimizer steps (0: only at the end and on SIGTERM)
    keep: int = 3                       # complete checkpoints kept; older ones are deleted after a save
    resume: Literal["auto", "never", "must"] = "auto"   # auto: resume from `latest` when it exists
    fallback: bool = False              # a corrupt latest checkpoint: load the previous complete one instead


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/stdlib.bin"       # memory-mapped uint8/uint16 token file from `moe-dist prepare-data`
    val_fraction: float = 0.05


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}

# Fields that were renamed or replaced: (section, old name) → what to write instead.
REPLACED = {
    ("train", "activation_checkpointing"): "train.recompute: block (was true) or none (was false)",
}


# torch.manual_seed takes up to 2**64 - 1 and numpy's generators only non-negative seeds; the trainer adds the
# rank, and on a resharded resume seed * 1_000_003 + step * 1009 + rank, which stays below 2**64 from here.
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A config value is wrong; the message names the field, the value and the fix."""


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _unknown(kind: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown {kind} '{key}'{hint}")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or raise naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(path, value, inner)
    if origin is list:
        if isinstance(value, str):
            # A list given as text (an environment variable or a quoted YAML value): "4,4" or "[4, 4]".
            text = value.strip().removeprefix("[").removesuffix("]")
            value = [v.strip() for v in text.split(",")] if text.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list, e.g. [2, 3, 3, 2]")
        return [_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{path}={value!r} must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be an integer") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be a number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise ConfigError(f"{path}={value!r} must be a finite number")
        return number
    if tp is str:
        if value is None:
            # YAML's null (or an empty `out_dir:`) in a text field that has no "unset" meaning: str(None) would
            # make a folder named "None".
            raise ConfigError(f"{path} is null, which this field does not take; give it a value, or delete the "
                              "line to keep the default")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}={value!r} must be text, not a {'mapping' if isinstance(value, dict) else 'list'}")
        return str(value)
    return value


def from_dict(raw: dict[str, Any], where: Optional[dict[str, str]] = None) -> Config:
    """A Config from nested mappings; `where` maps "section.field" to "file:line" for the messages."""
    where = where or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    types = _section_types()
    sections = {}
    for name, values in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"config section {name!r} is not a name; sections are {', '.join(SECTIONS)}")
        if name not in types:
            raise _unknown("config section", name, list(types))
        cls = types[name]
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"section '{name}' must be a mapping of fields, got {type(values).__name__}: {values!r}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in (values or {}).items():
            if not isinstance(key, str):
                raise ConfigError(f"field {key!r} in section '{name}' is not a name; known: {', '.join(sorted(hints))}")
            if (name, key) in REPLACED:
                raise ConfigError(f"{name}.{key} was replaced; use {REPLACED[name, key]}")
            if key not in hints:
                raise _unknown(f"field in '{name}'", key, list(hints))
            try:
                kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
            except ConfigError as e:
                if f"{name}.{key}" not in where:
                    raise
                raise ConfigError(f"{where[name + '.' + key]}: {e}") from None
        sections[name] = cls(**kwargs)
    return Config(**sections)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` (or ``--section.field=value``) strings; values parse as YAML scalars."""
    raw = to_dict(cfg)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --section.field=value")
        key, value = text.split("=", 1)
        if key.count(".") != 1:
            raise ConfigError(f"override key '{key}' must be section.field, e.g. moe.top_k")
        section, name = key.split(".")
        if (section, name) in REPLACED:
            raise ConfigError(f"{section}.{name} was replaced; use {REPLACED[section, name]}")
        if section not in raw:
            raise _unknown("config section", section, list(raw))
        if name not in raw[section]:
            raise _unknown(f"field in '{section}'", name, list(raw[section]))
        # Text fields keep the text as typed (YAML would turn out_dir=001 into 1).
        is_text = typing.get_type_hints(type(getattr(cfg, section)))[name] is str
        raw[section][name] = value if is_text or value == "" else yaml.safe_load(value)
    return from_dict(raw)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain values only: a `!!python/...` tag is refused) that also refuses a key given
    twice in one mapping: the plain loader keeps the last one silently, so a config with two `model:` sections
    would train the second alone."""

    source = "<config>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue            # `<<: *anchor` merges are overridden by explicit keys on purpose
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:       # an unhashable key: the base class reports it with its position
                    continue
                if first is not None:
                    lines = f"lines {first} and {line}" if first != line else f"both on line {line}"
                    raise ConfigError(f"{self.source}:{line}: key {key!r} appears twice in one mapping ({lines}); "
                                      "the first would be ignored: merge them into one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _positions(node) -> dict[str, str]:
    """"section.field" -> the line it is on, from the document's node tree (for messages)."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(value, yaml.MappingNode):
                for field_key, _ in value.value:
                    out[f"{key.value}.{field_key.value}"] = field_key.start_mark.line + 1
    return out


def _read_yaml(path: Path) -> tuple[Any, dict[str, str]]:
    """The YAML document in `path` and where each section.field sits; every failure is a ConfigError naming
    the file (and the line and column, or the byte offset)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror}); check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                          f"(line {line}); save it as UTF-8") from None
    loader = _StrictLoader(text.removeprefix("\ufeff"))
    loader.source = str(path)
    try:
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        fix = ("configs hold plain values only (no tags)" if isinstance(e, yaml.constructor.ConstructorError)
               else "fix the YAML syntax there")
        raise ConfigError(f"{at}: {what}; {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}; fix the YAML there") from None
    finally:
        loader.dispose()
    return raw, {k: f"{path}:{line}" for k, line in _positions(node).items()}


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; presets are in configs/")
    raw, where = _read_yaml(path)
    cfg = apply_overrides(from_dict(raw, where), overrides or [])
    validate(cfg)
    return cfg


def validate_moe(m: MoEConfig) -> None:
    def bad(name: str, msg: str) -> ConfigError:
        return ConfigError(f"moe.{name}={getattr(m, name)!r}: {msg}")

    if m.num_experts < 1:
        raise bad("num_experts", "must be >= 1")
    if m.top_k < 1:
        raise bad("top_k", "must be >= 1")
    if m.top_k > m.num_experts:
        raise bad("top_k", f"cannot exceed moe.num_experts={m.num_experts}; lower top_k or add experts")
    if m.expert_hidden < 1:
        raise bad("expert_hidden", "must be >= 1")
    if m.capacity_factor is not None and not m.capacity_factor > 0:
        raise bad("capacity_factor", "must be > 0, or null for dropless routing")
    if m.min_capacity < 0:
        raise bad("min_capacity", "must be >= 0")
    if m.capacity_groups < 1:
        raise bad("capacity_groups", "must be >= 1")
    if m.pad_to_capacity and m.capacity_factor is None:
        raise bad("pad_to_capacity", "needs moe.capacity_factor to be set (dropless has no capacity)")
    if m.num_groups < 1:
        raise bad("num_groups", "must be >= 1")
    if m.num_experts % m.num_groups:
        raise bad("num_groups", f"must divide moe.num_experts={m.num_experts}")
    if not 1 <= m.topk_groups <= m.num_groups:
        raise bad("topk_groups", f"must be between 1 and moe.num_groups={m.num_groups}")
    if m.num_groups > 1 and m.top_k > m.topk_groups * (m.num_experts // m.num_groups):
        raise bad("top_k", f"exceeds the {m.topk_groups * (m.num_experts // m.num_groups)} experts in the "
                  "selected groups; raise moe.topk_groups")
    if m.jitter_eps < 0 or m.jitter_eps >= 1:
        raise bad("jitter_eps", "must be in [0, 1)")
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        if getattr(m, name) < 0:
            raise bad(name, "must be >= 0")
    if m.route_scale <= 0:
        raise bad("route_scale", "must be > 0")
    if m.num_shared_experts < 0:
        raise bad("num_shared_experts", "must be >= 0")
    if m.shared_expert_hidden is not None and m.shared_expert_hidden < 1:
        raise bad("shared_expert_hidden", "must be >= 1, or null for num_shared_experts * expert_hidden")
    if m.shared_expert_gate and m.num_shared_experts == 0:
        raise bad("shared_expert_gate", "gates the shared experts, but moe.num_shared_experts=0; add shared experts "
                  "or set shared_expert_gate false")


def validate(cfg: Config) -> None:
    """Check every field; raise :class:`ConfigError` (a ValueError) naming the field, the value and the fix.
    Fields one at a time and with each other; the parallel layout (the sizes against each other, the model and
    the world) is judged by `moe_dist.parallel.layout.check_layout`, which every command and the trainer call."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "dense_hidden", "moe_every"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name}={getattr(m, name)}: must be >= 1")
    if m.first_dense < 0:
        raise ConfigError(f"model.first_dense={m.first_dense}: must be >= 0")
    if m.n_kv_heads is not None and (m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads):
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; "
                          "choose a head count that divides dim, or set model.head_dim")
    if m.head_dim is not None and m.head_dim < 2:
        raise ConfigError(f"model.head_dim={m.head_dim}: must be >= 2, or null for model.dim // model.n_heads")
    if (m.head_dim or m.dim // m.n_heads) % 2:
        raise ConfigError(f"the head size {m.head_dim or m.dim // m.n_heads} (model.head_dim, or model.dim / "
                          "model.n_heads) must be even for rotary embeddings")
    validate_moe(cfg.moe)
    if p.timeout_s <= 0:
        raise ConfigError(f"parallel.timeout_s={p.timeout_s}: must be > 0")
    if p.stall_warn_s <= 0:
        raise ConfigError(f"parallel.stall_warn_s={p.stall_warn_s}: must be > 0 (seconds without progress before a "
                          "stalled collective is reported)")
    for name in ("steps", "batch_size", "seq_len", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          "lower seq_len or raise max_seq_len")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 0")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}")
    for name in ("grad_accum_steps", "eval_batches"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every}: must be >= 0 (0 evaluates only at the end)")
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"train.zero_stage={t.zero_stage}: must be 0, 1 or 2 (stage 3 does not shard MoE experts "
                          "in DeepSpeed)")
    if t.shard_optimizer != "none" and t.engine == "deepspeed":
        raise ConfigError(f"train.shard_optimizer={t.shard_optimizer!r} with train.engine='deepspeed': DeepSpeed "
                          "shards by its own ZeRO stage; set train.zero_stage (1: states, 2: states+grads) and "
                          "train.shard_optimizer=none, or use train.engine=native")
    if t.deepspeed_config is not None and t.engine != "deepspeed":
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config!r} is set but train.engine={t.engine!r}; "
                          "set train.engine=deepspeed or drop deepspeed_config")
    if not 0 <= t.seed <= SEED_MAX:
        raise ConfigError(f"train.seed={t.seed}: must be in 0..{SEED_MAX} (2**32 - 1); the trainer seeds torch and "
                          "numpy with it, offset by the rank and the step")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    c = cfg.checkpoint
    if c.every < 0:
        raise ConfigError(f"checkpoint.every={c.every}: must be >= 0 (0 saves only at the end and on SIGTERM)")
    if c.keep < 1:
        raise ConfigError(f"checkpoint.keep={c.keep}: must be >= 1")

