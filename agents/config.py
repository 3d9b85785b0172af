"""The configuration of a training run: one table per concern, as in the TOML files of ``agents/configs/``.

    [run]         epochs, seed, device, checkpoint_every, keep_checkpoints, compile, tf32
    [env]         model, prompts or prompt_file, num_inference_steps, eta, sampler, sampler_options,
                  guidance_scale, num_envs, samples_per_prompt, batches_per_epoch, shared_noise,
                  branch_step, height, width, negative_prompt
    [reward]      name, monitor
    [advantages]  per_prompt, tracker_buffer_size, tracker_min_count, clip
    [optimizer]   learning_rate, lora_rank, max_grad_norm
    [algorithm]   name, and the fields of that algorithm's own config (:mod:`agents.algorithms`)

:class:`TrainConfig` holds one dataclass per table; :meth:`TrainConfig.from_tables` builds it from
plain tables (a TOML file, the saved ``config.json``, or a dict in code) and checks every value's
type, naming the table, key and what is allowed; :meth:`TrainConfig.to_tables` gives the plain
values a run records. Every field is also a command-line flag (:func:`add_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch

from agents.algorithms import available_algorithms, get_algorithm
from diffusion_env.backends import DenoiserBackend, registered_name


class ConfigError(ValueError):
    """A configuration value or key that is not allowed; the message says which and what is."""


# ---------------------------------------------------------------------------- value checks


def _allowed(hint: Any) -> str:
    """What a type hint allows, in words."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_allowed(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(hint))
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table", type(None): "none (omit the key)"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(hint: Any, value: Any) -> bool:
    if hint is Any:
        return True
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def checked_value(owner: type, name: str, value: Any) -> Any:
    """``value`` of field ``name`` of the dataclass ``owner``, type-checked (an int given for a float becomes a float).

    Raises:
        ConfigError: naming the field, the value and what its type allows.
    """
    hint = typing.get_type_hints(owner)[name]
    if not _matches(hint, value):
        raise ConfigError(f"{name} = {value!r}: allowed: {_allowed(hint)}")
    if isinstance(value, int) and not isinstance(value, bool) and not _takes_int(hint):
        return float(value)
    return value


def _takes_int(hint: Any) -> bool:
    """Whether ``hint`` accepts an int as it is (not only as a float)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_takes_int(arg) for arg in typing.get_args(hint))
    return hint is int or hint is Any or (typing.get_origin(hint) is Literal and any(type(a) is int for a in typing.get_args(hint)))


class _Table:
    """A config table: its fields are type-checked on construction, then :meth:`validate` checks ranges."""

    def __post_init__(self) -> None:
        for config_field in dataclasses.fields(self):
            setattr(self, config_field.name, checked_value(type(self), config_field.name, getattr(self, config_field.name)))
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError for a value out of its range."""

    def _at_least(self, names: tuple[str, ...], minimum: int) -> None:
        for name in names:
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name}={getattr(self, name)}; allowed: an integer >= {minimum}")


# ---------------------------------------------------------------------------- the tables


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RunSettings(_Table):
    """``[run]``: how long, from which seed, where, and how often to checkpoint."""

    epochs: int = field(default=10, metadata={"help": "training epochs"})
    seed: int = field(default=0, metadata={"help": "seed of prompts, noise, LoRA initialisation and minibatch order"})
    device: str = field(default_factory=_default_device, metadata={"help": "torch device", "default": "cuda if available, else cpu"})
    checkpoint_every: int = field(default=1, metadata={"help": "epochs between checkpoints (the last epoch is always saved)"})
    keep_checkpoints: int = field(default=0, metadata={"help": "checkpoints kept on disk, the latest ones; 0 keeps all"})
    compile: str | None = field(
        default=None,
        metadata={"help": "torch.compile the network with this backend (inductor on a GPU; eager or aot_eager to check "
                  "a model compiles)", "default": "not compiled"},
    )
    tf32: bool = field(
        default=True, metadata={"help": "on CUDA, float32 matrix products and convolutions in TF32 (Ampere and newer)"}
    )

    def validate(self) -> None:
        self._at_least(("epochs", "checkpoint_every"), 1)
        self._at_least(("keep_checkpoints",), 0)
        backends = torch.compiler.list_backends(exclude_tags=())
        if self.compile is not None and self.compile not in backends:
            raise ConfigError(f"compile={self.compile!r}; allowed: a torch.compile backend, one of {backends}")


@dataclass
class EnvSettings(_Table):
    """``[env]``: the model, its sampler and prompts, and how many trajectories an epoch samples."""

    model: str | DenoiserBackend | None = field(
        default=None,
        metadata={
            "help": "registered model name (e.g. shapes32, sd-1.5), hub id or pipeline folder; in code also a back-end "
            "built by make_denoiser",
            "default": "the env's, shapes32",
        },
    )
    prompts: str = field(default="scenes_train", metadata={"help": "registered prompt-set name"})
    prompt_file: str | None = field(
        default=None, metadata={"help": "text file of prompts, one a line, used instead of prompts (recorded as its absolute path)"}
    )
    num_inference_steps: int = field(default=20, metadata={"help": "denoising steps per trajectory"})
    eta: float | None = field(default=None, metadata={"help": "DDIM eta in (0, 1]", "default": "the sampler's, 1.0 for DDIM"})
    sampler: str | None = field(
        default=None,
        metadata={"help": "registered sampler name (ddim_ddpm, flow)", "default": "the one of the model's scheduler"},
    )
    sampler_options: dict = field(
        default_factory=dict,
        metadata={"help": "the sampler's own options, a TOML table or JSON object, e.g. {\"noise\": \"dance\", "
                  "\"noise_level\": 0.5, \"window\": [0, 3]} for the flow samplers", "default": "none"},
    )
    guidance_scale: float | None = field(default=None, metadata={"help": "classifier-free guidance", "default": "the model's"})
    num_envs: int = field(default=16, metadata={"help": "trajectories sampled per batch"})
    samples_per_prompt: int = field(default=1, metadata={"help": "samples of each prompt in a batch (divides num_envs)"})
    batches_per_epoch: int = field(default=4, metadata={"help": "batches sampled per epoch"})
    shared_noise: bool = field(
        default=False, metadata={"help": "the samples_per_prompt samples of a prompt start from one x_T (DanceGRPO)"}
    )
    branch_step: int = field(
        default=0,
        metadata={"help": "the samples of a prompt share their trajectory up to this step and are trained after it "
                  "(TempFlow-GRPO, BranchGRPO; needs shared_noise); 0: no shared prefix"},
    )
    height: int | None = field(default=None, metadata={"help": "image height (Stable Diffusion)", "default": "the model's"})
    width: int | None = field(default=None, metadata={"help": "image width (Stable Diffusion)", "default": "the model's"})
    negative_prompt: str | None = field(
        default=None, metadata={"help": "prompt of the unconditional branch of guidance (Stable Diffusion)", "default": "empty"}
    )

    def validate(self) -> None:
        self._at_least(("num_inference_steps", "num_envs", "samples_per_prompt", "batches_per_epoch"), 1)
        self._at_least(("branch_step",), 0)
        if self.branch_step >= self.num_inference_steps:
            raise ConfigError(
                f"branch_step={self.branch_step} with num_inference_steps={self.num_inference_steps}; "
                "allowed: a step before the last, 0 <= branch_step < num_inference_steps"
            )
        if self.branch_step > 0 and not self.shared_noise:
            raise ConfigError(
                f"branch_step={self.branch_step} needs shared_noise = true (a group shares its trajectory up to the "
                "branch, x_T included); allowed: shared_noise = true, or branch_step = 0"
            )
        if self.prompt_file is not None:
            self.prompt_file = str(Path(self.prompt_file).expanduser().resolve())

    def recorded_model(self) -> str | None:
        """The model as a run records it: its registered name.

        Raises:
            ConfigError: for a back-end object that was not built from the registry by name.
        """
        if self.model is None or isinstance(self.model, str):
            return self.model
        name = registered_name(self.model)
        if name is None:
            raise ConfigError(
                f"model={type(self.model).__name__} object: a run records its model by name, and this back-end has none; "
                "allowed: a registered model name, or a back-end built with diffusion_env.backends.make_denoiser(name) "
                "(register a new one with diffusion_env.backends.register_model)"
            )
        return name


@dataclass
class RewardSettings(_Table):
    """``[reward]``: the reward trained on, and one only logged."""

    name: str = field(
        default="jpeg_compressibility",
        metadata={"help": "registered reward name, weighted sum (a+0.5*b) or reward server URL (http://host:port)", "flag": "reward"},
    )
    monitor: str | None = field(
        default=None,
        metadata={"help": "reward scored on each epoch's images for logging only (charts/monitor/...), e.g. scene_alignment"},
    )


@dataclass
class AdvantageSettings(_Table):
    """``[advantages]``: rewards normalised per prompt (DDPO, Black et al., 2023, App. A) or per batch, then clipped.

    An algorithm with its own advantages (GRPO: within each group) uses ``clip`` only.
    """

    per_prompt: bool = field(
        default=True, metadata={"help": "per-prompt reward statistics (else the batch's)", "flag": "per-prompt-advantages"}
    )
    tracker_buffer_size: int = field(default=32, metadata={"help": "rewards kept per prompt"})
    tracker_min_count: int = field(default=16, metadata={"help": "below this many rewards of a prompt, batch statistics are used"})
    clip: float = field(default=5.0, metadata={"help": "advantages are clipped to +-this", "flag": "advantage-clip"})

    def validate(self) -> None:
        self._at_least(("tracker_buffer_size", "tracker_min_count"), 1)
        if self.tracker_min_count > self.tracker_buffer_size:
            raise ConfigError(
                f"tracker_min_count={self.tracker_min_count} > tracker_buffer_size={self.tracker_buffer_size}; "
                "allowed: tracker_min_count <= tracker_buffer_size"
            )
        if not self.clip > 0:
            raise ConfigError(f"clip={self.clip}; allowed: > 0")


@dataclass
class OptimizerSettings(_Table):
    """``[optimizer]``: AdamW over LoRA adapters (Hu et al., 2021) or the whole network."""

    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank through peft; 0 fine-tunes the whole network"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip of every optimiser step"})

    def validate(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate={self.learning_rate}; allowed: a finite number > 0")
        self._at_least(("lora_rank",), 0)
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm}; allowed: > 0")


@dataclass
class AlgorithmSettings:
    """``[algorithm]``: a registered algorithm's name and its own config (default: that config's defaults)."""

    name: str = field(default="ddpo-is", metadata={"help": "registered algorithm", "flag": "algorithm"})
    config: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in available_algorithms():
            raise ConfigError(f"name = {self.name!r}: allowed: one of {available_algorithms()}")
        algorithm = get_algorithm(self.name)
        if self.config is None:
            self.config = algorithm.make_config()
        elif not isinstance(self.config, algorithm.config_class):
            raise ConfigError(f"config is a {type(self.config).__name__}; allowed: a {algorithm.config_class.__name__} for {self.name!r}")

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AlgorithmSettings:
        """From ``{"name": ..., field: value, ...}``; fields are type-checked against the algorithm's config class."""
        values = dict(table)
        name = values.pop("name", cls.name)
        settings = cls(name)
        algorithm = get_algorithm(name)
        allowed = [f.name for f in algorithm.fields()]
        for key in values:
            if key not in allowed:
                raise ConfigError(f"{key!r} is no setting of algorithm {name!r}; allowed: name, {', '.join(allowed)}")
        checked = {key: checked_value(algorithm.config_class, key, value) for key, value in values.items()}
        settings.config = algorithm.make_config(checked)
        return settings

    def to_table(self) -> dict[str, Any]:
        algorithm = get_algorithm(self.name)
        return {"name": self.name, **{f.name: getattr(self.config, f.name) for f in algorithm.fields()}}


#: The tables of a config and the dataclass of each.
TABLES: dict[str, type] = {
    "run": RunSettings,
    "env": EnvSettings,
    "reward": RewardSettings,
    "advantages": AdvantageSettings,
    "optimizer": OptimizerSettings,
    "algorithm": AlgorithmSettings,
}


@dataclass
class TrainConfig:
    """Everything a training run depends on, one dataclass per table; saved beside its checkpoints.

    Build it from tables (``TrainConfig.from_tables({"run": {"epochs": 2}, "algorithm": {"name": "rwr"}})``)
    or from the table dataclasses; every table left out keeps its defaults.
    """

    run: RunSettings = field(default_factory=RunSettings)
    env: EnvSettings = field(default_factory=EnvSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    advantages: AdvantageSettings = field(default_factory=AdvantageSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    algorithm: AlgorithmSettings = field(default_factory=AlgorithmSettings)

    def __post_init__(self) -> None:
        if self.env.num_envs % self.env.samples_per_prompt:
            raise ConfigError(
                f"[env] samples_per_prompt={self.env.samples_per_prompt} does not divide num_envs={self.env.num_envs}; "
                "allowed: a divisor of num_envs"
            )

    @classmethod
    def from_tables(cls, tables: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """The config that ``tables`` (table name -> {key: value}) describe; missing keys keep their defaults.

        Raises:
            ConfigError: for an unknown table or key, a value of the wrong type or out of range;
                the message starts with ``source`` and names the table and key.
        """
        flat = [key for key, value in tables.items() if not isinstance(value, Mapping)]
        if flat:
            raise ConfigError(
                f"{source}: top-level keys {flat} are not in a table (flat config files are no longer read); "
                "move each key into its table: "
                + "; ".join(f"[{name}] {', '.join(table_keys(name))}" for name in TABLES)
                + " and the algorithm's own settings (see agents/configs/*.toml and --help)"
            )
        unknown = [name for name in tables if name not in TABLES]
        if unknown:
            raise ConfigError(f"{source}: unknown table [{unknown[0]}]; allowed: " + ", ".join(f"[{name}]" for name in TABLES))
        built: dict[str, Any] = {}
        for name, table_class in TABLES.items():
            values = dict(tables.get(name, {}))
            try:
                if table_class is AlgorithmSettings:
                    built[name] = AlgorithmSettings.from_table(values)
                    continue
                allowed = table_keys(name)
                for key in values:
                    if key not in allowed:
                        raise ConfigError(f"unknown key {key!r}; allowed: {', '.join(allowed)}")
                built[name] = table_class(**values)
            except (ConfigError, ValueError, TypeError) as error:
                raise ConfigError(f"{source}: [{name}] {error}") from None
        try:
            return cls(**built)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    def to_tables(self) -> dict[str, dict[str, Any]]:
        """Plain tables of names and values (JSON- and TOML-ready); the model is recorded by its registered name.

        Raises:
            ConfigError: for a model object without a registered name.
        """
        tables = {
            name: {f.name: getattr(getattr(self, name), f.name) for f in dataclasses.fields(getattr(self, name))}
            for name in TABLES
            if name != "algorithm"
        }
        tables["env"]["model"] = self.env.recorded_model()
        tables["algorithm"] = self.algorithm.to_table()
        return tables

    def with_changes(self, changes: Mapping[str, Mapping[str, Any]]) -> TrainConfig:
        """A copy with the given table entries replaced (e.g. ``{"env": {"num_envs": 16}}``).

        A back-end object given as the model is kept (not copied, not replaced by its name).
        """
        tables = merge_tables(self.to_tables(), changes)
        if not isinstance(self.env.model, str | None) and "model" not in changes.get("env", {}):
            tables["env"]["model"] = self.env.model
        return TrainConfig.from_tables(tables)


def table_keys(name: str) -> list[str]:
    """The keys of table ``name`` (of ``[algorithm]``: ``name`` only; each algorithm adds its own)."""
    return [f.name for f in dataclasses.fields(TABLES[name]) if f.name != "config"]


def merge_tables(base: Mapping[str, Mapping[str, Any]], changes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``base`` with each table's entries updated by ``changes`` (new dicts; the inputs are left as they are).

    When ``changes`` names another algorithm, the base's algorithm fields are dropped.
    """
    merged = {name: dict(table) for name, table in base.items()}
    for name, table in changes.items():
        if name == "algorithm" and "name" in table and table["name"] != merged.get("algorithm", {}).get("name"):
            merged["algorithm"] = {}
        merged.setdefault(name, {}).update(table)
    return merged


def read_config_file(path: Path) -> dict[str, Any]:
    """The tables of a TOML config file.

    Raises:
        ConfigError: if the file does not exist or is not valid TOML (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; allowed: a TOML file such as agents/configs/compressibility.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None


# ---------------------------------------------------------------------------- command-line flags


def _flag(config_field: dataclasses.Field) -> str:
    return "--" + config_field.metadata.get("flag", config_field.name).replace("_", "-")


def _json_object(text: str) -> dict[str, Any]:
    """A flag's JSON object (``--sampler-options '{"noise": "dance"}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error}); allowed: a JSON object such as '{{\"key\": 1}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; allowed: a JSON object such as '{{\"key\": 1}}'")
    return value


def _argument_type(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type ``hint``."""
    arguments = [arg for arg in typing.get_args(hint) if arg is not type(None)] if typing.get_origin(hint) in (Union, types.UnionType) else [hint]
    kind = arguments[0]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if typing.get_origin(kind) is Literal:
        return {"choices": list(typing.get_args(kind))}
    return {"type": kind if kind in (int, float) else str}


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def add_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, str]]:
    """Adds a flag per config field, with its default in the help; returns ``dest -> (table, key)``.

    Flags default to ``argparse.SUPPRESS``: only the flags given appear in the parsed namespace,
    so that a resumed run can tell what the command line sets. An algorithm field is one flag
    for every algorithm that has it.
    """
    destinations: dict[str, tuple[str, str]] = {}
    for name, table_class in TABLES.items():
        group = parser.add_argument_group(f"[{name}]", table_class.__doc__.split("\n")[0].partition(": ")[2])
        defaults = table_class() if table_class is not AlgorithmSettings else None
        hints = typing.get_type_hints(table_class)
        for config_field in dataclasses.fields(table_class):
            if config_field.name == "config":
                continue
            if table_class is AlgorithmSettings:
                help_text = f"{config_field.metadata['help']}: one of {available_algorithms()} (default: {AlgorithmSettings.name})"
                action = group.add_argument(_flag(config_field), default=argparse.SUPPRESS, metavar="NAME", help=help_text)
            else:
                default = config_field.metadata.get("default", _default_text(getattr(defaults, config_field.name)))
                help_text = f"{config_field.metadata['help']} (default: {default})"
                action = group.add_argument(
                    _flag(config_field), default=argparse.SUPPRESS, help=help_text, **_argument_type(hints[config_field.name])
                )
            destinations[action.dest] = (name, config_field.name)
    fields_by_name: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for algorithm_name in available_algorithms():
        for config_field in get_algorithm(algorithm_name).fields():
            fields_by_name.setdefault(config_field.name, []).append((algorithm_name, config_field))
    group = parser.add_argument_group("[algorithm] settings", "each applies to the algorithms named in its help")
    for key, owners in fields_by_name.items():
        algorithm_name, config_field = owners[0]
        texts = {name: _default_text(default_of(f)) for name, f in owners}
        defaults = next(iter(texts.values())) if len(set(texts.values())) == 1 else "; ".join(f"{t} for {n}" for n, t in texts.items())
        help_text = f"{config_field.metadata.get('help', key)} [{', '.join(name for name, _ in owners)}] (default: {defaults})"
        hint = typing.get_type_hints(get_algorithm(algorithm_name).config_class)[key]
        action = group.add_argument(_flag(config_field), default=argparse.SUPPRESS, help=help_text, **_argument_type(hint))
        destinations[action.dest] = ("algorithm", key)
    return destinations


def default_of(config_field: dataclasses.Field) -> Any:
    """A dataclass field's default value."""
    if config_field.default_factory is not dataclasses.MISSING:
        return config_field.default_factory()
    return config_field.default


def tables_from_flags(namespace: argparse.Namespace, destinations: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """The tables the given flags set (flags not given are absent from ``namespace``)."""
    tables: dict[str, dict[str, Any]] = {}
    for dest, (table, key) in destinations.items():
        if hasattr(namespace, dest):
            tables.setdefault(table, {})[key] = getattr(namespace, dest)
    return tables
