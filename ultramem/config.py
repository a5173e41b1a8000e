"""Nested dataclass configs, dotted overrides, save/load.

The run config is a tree: ``Config(model=ModelConfig(ffn=..., memory=...), train=..., data=...)``.
Layer configs (``model.ffn``, ``model.memory``) are polymorphic: each registered layer type has
its own dataclass (see :mod:`ultramem.layers.registry`), serialised with a ``"type"`` key.

Precedence (as in lingua): dataclass defaults < preset < config file (JSON) < dotted overrides,
resolved by :func:`ultramem.resolve.load_config` (above the presets, which import this module)::

    cfg = load_config(preset="tiny-ultramem", overrides=["model.d_model=128", "train.max_steps=20"])

Here: the tree, :func:`overlay` (a config file's dict onto a config), :func:`apply_override`
(one dotted override) and JSON save/load. Unknown fields are rejected with the nearest valid
name suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ultramem.layers  # noqa: F401  (fills the layer registry with every built-in type)
from ultramem.errors import ConfigError
from ultramem.layers.mlp import MLPConfig
from ultramem.layers.registry import LayerConfig, MemoryLayerConfig, layer_config_class, layer_types
from ultramem.placement import Wiring, plan_wiring


@dataclass
class ModelConfig:
    """Host transformer (math.md §1). Sizes follow the UltraMem paper's naming."""

    vocab_size: int = 50432
    d_model: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    ffn: LayerConfig = field(default_factory=MLPConfig)  # the per-block feed-forward part
    memory: MemoryLayerConfig | None = None  # memory layers wired by memory.placement (math.md §1)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def wiring(self) -> Wiring:
        """The one wiring plan (spans, replaced FFNs, each layer's shape) that the model, the
        accounting and :meth:`validate` use; raises ConfigError for a bad placement."""
        return plan_wiring(self.d_model, self.n_layers, self.ffn, self.memory)

    def validate(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", where="model.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"choose n_heads among {_divisors(self.d_model)[:12]}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.norm={self.norm!r}; allowed: 'layernorm', 'rmsnorm'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}; allowed: 0 <= dropout < 1")
        if isinstance(self.ffn, MemoryLayerConfig):
            raise ConfigError(
                f"model.ffn.type={self.ffn.type!r} is a memory layer; put it under model.memory "
                f"(ffn types: {layer_types('ffn')})"
            )
        if self.memory is not None and not isinstance(self.memory, MemoryLayerConfig):
            raise ConfigError(
                f"model.memory.type={self.memory.type!r} is not a memory layer; "
                f"memory types: {layer_types('memory')}"
            )
        plan = self.wiring()
        self.ffn.validate(plan.shared, "model.ffn")
        if self.memory is not None:
            self.memory.validate(plan.shared, "model.memory")


@dataclass
class DataConfig:
    """Where training tokens come from (see :mod:`ultramem.data`)."""

    path: str = "data/default"  # a prepared dataset directory (``ultramem data prepare``)
    seq_len: int = 256  # tokens per training window (<= model.max_seq_len)
    val_fraction: float = 0.01  # default of ``ultramem data prepare --val-fraction`` (hash split)

    def validate(self) -> None:
        _positive(self, "seq_len", where="data.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction}; allowed: 0 <= val_fraction < 1")


@dataclass
class TrainConfig:
    """Optimiser, schedule and loop (see :mod:`ultramem.train`; math.md §6 recipe)."""

    max_steps: int = 200  # optimiser steps
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine ends at min_lr_ratio * lr
    warmup_frac: float = 0.01  # linear warmup over this fraction of max_steps (>= 1 step)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max grad norm; 0 = off
    # which norm grad_clip applies to (ultramem.train.clip): "global" (one norm over every
    # parameter) | "exclude_values" (dense params on their own norm, value tables unclipped)
    # | "per_group" (dense params, and each value-table group, on its own norm)
    grad_clip_mode: str = "global"
    seed: int = 0  # model init and data order
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" = bf16 autocast on GPU, fp32 on CPU; or "bf16" | "fp32"
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # multi-process (torchrun): "ddp" | "fsdp" (FSDP2 fully_shard)
    memory_parallel: int = 1  # fsdp: ranks each memory table is split over (mp; docs/distributed.md)
    memory_partition: str = "auto"  # fsdp: "auto" (fewest bytes) | "row" | "col"
    memory_overlap: bool = False  # fsdp on CUDA: spans i:j (j > i) on a side stream beside blocks i+1..j
    log_every: int = 10  # progress-bar refresh and per-layer memory metrics
    eval_every: int = 100  # validation every N steps (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation
    ckpt_every: int = 100  # checkpoint every N steps (0 = only at the end / on a signal)
    keep_last: int = 2  # checkpoints kept
    checkpoint: bool = True  # False: never save (throughput benchmarks)
    tensorboard: bool = False  # also log to RUN/tb (needs tensorboard installed)
    peak_tflops: float = 0.0  # MFU denominator override (0 = known GPU table; none on CPU)
    deterministic: str = "auto"  # "auto" (= on for CPU) | "on" | "off"; see ultramem.train.determinism
    spike_factor: float = 0.0  # stop when loss > factor * mean of the last spike_window losses; 0 = off
    spike_window: int = 50

    def validate(self) -> None:
        _positive(self, "max_steps", "batch_size", "grad_accum", "log_every", "eval_batches", "spike_window",
                  where="train.")
        _at_least(self, 0, "eval_every", "ckpt_every", "keep_last", where="train.")
        _at_least(self, 0.0, "lr", "weight_decay", "grad_clip", "peak_tflops", "spike_factor", where="train.")
        if not 0.0 <= self.beta1 < 1.0 or not 0.0 <= self.beta2 < 1.0:
            raise ConfigError(f"train.beta1={self.beta1}, train.beta2={self.beta2}; allowed: 0 <= beta < 1")
        if self.deterministic not in ("auto", "on", "off"):
            raise ConfigError(f"train.deterministic={self.deterministic!r}; allowed: 'auto', 'on', 'off'")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device={self.device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.dtype={self.dtype!r}; allowed: 'auto', 'bf16', 'fp32'")
        if self.grad_clip_mode not in ("global", "exclude_values", "per_group"):
            raise ConfigError(f"train.grad_clip_mode={self.grad_clip_mode!r}; "
                              "allowed: 'global', 'exclude_values', 'per_group'")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel={self.parallel!r}; allowed: 'ddp', 'fsdp'")
        if self.memory_parallel < 1 or (self.memory_parallel > 1 and self.parallel != "fsdp"):
            raise ConfigError(f"train.memory_parallel={self.memory_parallel}; allowed: 1, or > 1 with "
                              "train.parallel=fsdp (it must divide the number of processes)")
        if self.memory_partition not in ("auto", "row", "col"):
            raise ConfigError(f"train.memory_partition={self.memory_partition!r}; allowed: 'auto', 'row', 'col'")
        if self.memory_overlap and self.parallel != "fsdp":
            raise ConfigError("train.memory_overlap=true needs train.parallel=fsdp (the overlap is installed "
                              "by parallelize; docs/distributed.md §4)")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError("train.min_lr_ratio must be in [0, 1] and train.warmup_frac in [0, 1)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return from_dict(cls, d, "")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- helpers


def _positive(obj: Any, *names: str, where: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}{name}={value!r} must be a positive integer")


def _at_least(obj: Any, low: float, *names: str, where: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if not value >= low:  # NaN fails too
            raise ConfigError(f"{where}{name}={value!r}; allowed: >= {low}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain JSON-able dict; layer configs carry their ``type``."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        if isinstance(obj, LayerConfig):
            out["type"] = obj.type
        for f in dataclasses.fields(obj):
            out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(name: str, where: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{near[0]}'?" if near else ""
    return ConfigError(f"unknown config field '{where}{name}'{hint} (valid: {', '.join(valid)})")


def _is_layer_type(tp: Any) -> bool:
    args = typing.get_args(tp) or (tp,)
    return any(isinstance(a, type) and issubclass(a, LayerConfig) for a in args)


def _layer_from_dict(d: dict[str, Any], where: str) -> LayerConfig:
    d = dict(d)
    if "type" not in d:
        raise ConfigError(f"{where} needs a 'type' (one of {layer_types()})")
    cls = layer_config_class(d.pop("type"), where)
    return from_dict(cls, d, where + ".")


def from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    """Plain dict -> dataclass ``cls``, rejecting unknown keys with a suggestion."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a JSON object, got {d!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in names:
            raise _unknown(key, where, names)
        tp = hints[key]
        if value is not None and _is_layer_type(tp):
            kwargs[key] = _layer_from_dict(value, f"{where}{key}")
        elif value is not None and dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a JSON or command-line value to the annotated type, or raise a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}={value!r} is invalid")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, inner, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}={value!r} must be a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be an integer") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be a number") from None
    if tp is str:
        return str(value)
    return value


def overlay(obj: Any, d: dict[str, Any], where: str = "") -> Any:
    """Overlay a config file's nested dict onto the dataclass ``obj`` in place (and return it):
    fields the dict names replace those of ``obj``, the rest stay (a preset under a file).

    A layer config the dict gives without a ``"type"``, or with the type it already has, is
    overlaid the same way; one with another type (or where ``obj`` has none) is built from the
    dict and that type's defaults, as :meth:`Config.from_dict` builds it. ``null`` removes it."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a JSON object, got {d!r}")
    hints = _field_types(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in d.items():
        if key not in names:
            raise _unknown(key, where, names)
        tp, current = hints[key], getattr(obj, key)
        if value is not None and _is_layer_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a JSON object with a 'type', got {value!r}")
            fields = {k: v for k, v in value.items() if k != "type"}
            kind = value.get("type")
            if current is None or (kind is not None and kind != current.type):
                setattr(obj, key, _layer_from_dict(value, f"{where}{key}"))
            else:
                overlay(current, fields, f"{where}{key}.")
        elif value is not None and dataclasses.is_dataclass(tp):
            overlay(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, tp, f"{where}{key}"))
    return obj


def apply_override(cfg: Config, dotted: str) -> None:
    """Apply one ``a.b.c=value`` override in place.

    ``model.memory=none`` removes the memory layers; ``model.memory.type=pkm`` (or
    ``model.ffn.type=moe``) switches the layer type, keeping the fields both types share.
    """
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like field.path=value")
    path, raw = dotted.split("=", 1)
    parts = path.strip().split(".")
    obj: Any = cfg
    where = ""
    for name in parts[:-1]:
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            raise _unknown(name, where, names)
        child = getattr(obj, name)
        if child is None and parts[-1] == "type" and name == parts[-2]:  # model.memory.type=pkm
            tp = _field_types(type(obj))[name]
            if _is_layer_type(tp):
                setattr(obj, name, layer_config_class(raw, f"{where}{name}.type")())
                return
        if child is None:
            raise ConfigError(
                f"{where}{name} is unset; set {where}{name}.type=<type> first "
                f"(types: {layer_types()})"
            )
        obj, where = child, f"{where}{name}."
    last = parts[-1]
    if isinstance(obj, LayerConfig) and last == "type":
        parent = _parent(cfg, parts[:-1])
        new_cls = layer_config_class(raw, where + "type")
        shared = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        keep = {k: v for k, v in shared.items() if k in {f.name for f in dataclasses.fields(new_cls)}}
        setattr(parent, parts[-2], new_cls(**keep))
        return
    names = [f.name for f in dataclasses.fields(obj)]
    if last not in names:
        raise _unknown(last, where, names)
    tp = _field_types(type(obj))[last]
    if _is_layer_type(tp):
        if raw.lower() in ("none", "null"):
            setattr(obj, last, None)
        else:
            setattr(obj, last, layer_config_class(raw, f"{where}{last}")())
        return
    setattr(obj, last, _coerce(raw, tp, where + last))


def _parent(cfg: Config, parts: list[str]) -> Any:
    obj: Any = cfg
    for name in parts[:-1]:
        obj = getattr(obj, name)
    return obj


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON config file as a dict; ConfigError naming the file for every way it can be wrong."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--config {p}: no such file")
    if p.is_dir():
        raise ConfigError(f"--config {p}: is a directory, not a JSON file (a run's is RUN/config.json)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: unreadable ({e})") from None
    if not text.strip():
        raise ConfigError(f"--config {p}: the file is empty")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {p}: expected a JSON object like {{\"train\": {{...}}}}, got {type(d).__name__}")
    return d

