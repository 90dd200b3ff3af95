"""The command line's config file: one TOML or JSON file that names the model, the defaults and the concepts.

    model = "miniature-world"        # the world this repository ships, a diffusers folder, or a single-file
                                     # SD1.x / SD2.x / SDXL checkpoint (.safetensors / .ckpt)
    out = "models/embeddings"        # <name>.safetensors go here; the runs' own files in ../inversion_runs
    if_exists = "error"              # error | overwrite | resume, for every concept (a concept may override it)

    [defaults]                       # any concept key, for every concept that does not set it
    method = "adaptive"
    steps = 300

    [defaults.options]               # Training Options, by the node's input names
    flip = true

    [[concepts]]
    name = "my-cat"                  # the file name and the word after "embedding:"
    images = "images/cat"            # a folder, relative to this file
    init_text = "a grey tabby cat"   # or init_word = "cat" (with k vectors)

Concept keys, with the nodes' names and defaults: ``name``, ``images``, ``init_text`` / ``init_word``
and ``k``, ``method``, ``steps``, ``learning_rate`` (0 = the method's own), ``batch_size``, ``seed``,
``if_exists``, ``size`` and ``fit`` (Load Concept Images; size 0 = the model's native size),
``alpha_as_mask``, ``options`` (Training Options' inputs) and ``profile`` (Gradient Norm Profiler's
``bins``, ``samples_per_bin``, ``batch_size``, ``seed``, for the high_grad methods, which need one).
Values are checked by the same code the nodes use, and every error names the concept and the key.
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..data.dataset import FIT_MODES
from ..embedding import validate_name
from ..files.runs import IF_EXISTS, check_names
from ..methods.presets import DEFAULT_METHOD, PRESETS
from ..options import TrainingOptions

__all__ = ["RunConfig", "ConceptSpec", "ProfileSpec", "ConfigError", "load_config", "parse_config", "WORLD"]

WORLD = "miniature-world"  # the model name of the world this repository ships (no download)


class ConfigError(ValueError):
    """A config file that cannot run; the message names the concept and the key."""


@dataclass(frozen=True)
class ProfileSpec:
    """Gradient Norm Profiler's inputs, for the methods that need a profile (high_grad*)."""

    bins: int = 20
    samples_per_bin: int = 4
    batch_size: int = 4
    seed: int = 0


@dataclass(frozen=True)
class ConceptSpec:
    """One concept of the file, every key checked."""

    name: str
    images: Path
    init_text: str = ""
    init_word: str = ""
    k: int = 1
    method: str = DEFAULT_METHOD
    steps: int = 500
    learning_rate: float = 0.0  # 0 = the method's own rate
    batch_size: int = 1
    seed: int = 0
    if_exists: str = "error"
    size: int = 0  # 0 = the model's native size
    fit: str = "crop"
    alpha_as_mask: bool = True
    options: dict = field(default_factory=dict)  # Training Options set in the file (checked); the rest: defaults
    profile: ProfileSpec = field(default_factory=ProfileSpec)

    def training_options(self, model_defaults: Mapping[str, Any] | None = None) -> TrainingOptions:
        """The concept's Training Options: the file's, over the model's own defaults (the miniature world's
        templates), over the node's."""
        return TrainingOptions(**{**(model_defaults or {}), **self.options}).validate()


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: Path
    runs: Path
    report: Path
    concepts: tuple[ConceptSpec, ...]
    model_config: str = ""  # a local diffusers folder with the configs from_single_file needs (offline)
    source: Path | None = None  # the file it was read from

    def describe(self) -> list[str]:
        """One line per concept: what would run."""
        return [f"{c.name}: {c.method}, {c.steps} steps, batch {c.batch_size}, lr "
                f"{c.learning_rate or 'the method default'}, seed {c.seed}, images {c.images}, init "
                f"{c.init_text or (c.init_word + (' x' + str(c.k) if c.k > 1 else ''))!r}, if_exists {c.if_exists} "
                f"-> {self.out / (c.name + '.safetensors')}" for c in self.concepts]


_SIMPLE = {f.name: f for f in fields(ConceptSpec) if f.name not in ("options", "profile", "name", "images")}
_TOP = ("model", "out", "runs", "report", "if_exists", "defaults", "concepts", "model_config")


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and check a TOML (``.toml``) or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config: {path} is not valid JSON: {e}") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ConfigError("config: reading TOML needs Python 3.11 or newer; write the file as JSON") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    return parse_config(raw, base=path.parent, source=path)


def _check_type(where: str, key: str, value: Any, want: type) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is Path:
        want = str
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {want.__name__}, got {value!r}")
    return value


def parse_config(raw: Mapping[str, Any], base: str | os.PathLike = ".", source: Path | None = None) -> RunConfig:
    """Check a config already read into a dict (``load_config`` reads the file)."""
    base = Path(base)
    if not isinstance(raw, Mapping):
        raise ConfigError("config: the file must hold a table (TOML) or an object (JSON)")
    unknown = sorted(set(raw) - set(_TOP))
    if unknown:
        raise ConfigError(f"config: unknown key {unknown[0]!r}; the file's keys are {', '.join(_TOP)}")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"config: model must name the model: {WORLD!r}, a diffusers folder or a checkpoint file")
    model = model.strip() if model.strip() == WORLD else str(_path(base, model))
    out = _path(base, _check_type("config", "out", raw.get("out", "models/embeddings"), str))
    runs = _path(base, _check_type("config", "runs", raw.get("runs", str(out.parent / "inversion_runs")), str))
    report = _path(base, _check_type("config", "report", raw.get("report", str(out.parent / "inversion_report.json")),
                                     str))
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError("defaults: must be a table of concept keys")
    if "if_exists" in raw:
        defaults = {"if_exists": raw["if_exists"], **defaults}
    concepts = raw.get("concepts")
    if not isinstance(concepts, list) or not concepts:
        raise ConfigError("concepts: give at least one [[concepts]] table (name, images, init_text or init_word)")
    _check_keys("defaults", defaults, allow_name=False)
    specs = tuple(_concept(i, c, defaults, base) for i, c in enumerate(concepts))
    try:
        check_names([c.name for c in specs])
    except ValueError as e:
        raise ConfigError(str(e).replace("the trainer's name input and each Add Concept node's name",
                                         "each [[concepts]] table's name")) from None
    model_config = raw.get("model_config", "")
    if model_config:
        model_config = str(_path(base, _check_type("config", "model_config", model_config, str)))
    return RunConfig(model, out, runs, report, specs, model_config, source)


def _path(base: Path, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else (base / q).resolve()


def _check_keys(where: str, table: Mapping[str, Any], allow_name: bool = True) -> None:
    known = (["name", "images"] if allow_name else ["images"]) + list(_SIMPLE) + ["options", "profile"]
    for k in table:
        if k not in known:
            raise ConfigError(f"{where}: unknown key {k!r}; a concept's keys are {', '.join(known)}")


def _concept(i: int, table: Any, defaults: Mapping[str, Any], base: Path) -> ConceptSpec:
    if not isinstance(table, Mapping):
        raise ConfigError(f"concepts[{i}]: must be a table with name, images and init_text or init_word")
    name = table.get("name")
    where = f"concept {name!r} (concepts[{i}])" if isinstance(name, str) else f"concepts[{i}]"
    _check_keys(where, table)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name is missing; give each concept a name (its file <name>.safetensors)")
    try:
        validate_name(name)
    except ValueError as e:
        raise ConfigError(f"{where}: name: {e}") from None
    merged = {**defaults, **table}
    options = {**defaults.get("options", {}), **table.get("options", {})}
    profile = {**defaults.get("profile", {}), **table.get("profile", {})}
    kw: dict[str, Any] = {}
    for k, f in _SIMPLE.items():
        if k in merged:
            kw[k] = _check_type(where, k, merged[k], {"int": int, "float": float, "str": str, "bool": bool}[f.type]
                                if isinstance(f.type, str) else f.type)
    images = merged.get("images")
    if not isinstance(images, str):
        raise ConfigError(f"{where}: images must name the folder of the concept's images")
    images = _path(base, images)
    if not images.is_dir():
        raise ConfigError(f"{where}: images: {images} is not a folder; put the concept's images in one")
    spec = ConceptSpec(name=name, images=images, options=_options(where, options), profile=_profile(where, profile),
                       **kw)
    _check_concept(where, spec)
    return spec


def _options(where: str, options: Mapping[str, Any]) -> dict:
    known = [f.name for f in fields(TrainingOptions)]
    for k in options:
        if k not in known:
            raise ConfigError(f"{where}: options: unknown option {k!r}; Training Options has {', '.join(known)}")
    try:
        TrainingOptions(**options).validate().template_list()  # the node's checks and messages
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: options: {e}") from None
    return dict(options)


def _profile(where: str, profile: Mapping[str, Any]) -> ProfileSpec:
    known = [f.name for f in fields(ProfileSpec)]
    for k, v in profile.items():
        if k not in known:
            raise ConfigError(f"{where}: profile: unknown key {k!r}; a profile has {', '.join(known)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "seed" else 1):
            raise ConfigError(f"{where}: profile: {k} must be a whole number >= {0 if k == 'seed' else 1}, got {v!r}")
    return ProfileSpec(**profile)


def _check_concept(where: str, c: ConceptSpec) -> None:
    if bool(c.init_text.strip()) == bool(c.init_word.strip()):
        raise ConfigError(f"{where}: give init_text (one vector per token, e.g. 'a grey tabby cat') or init_word "
                          "(one word, k vectors), not both and not neither")
    if c.method not in PRESETS:
        raise ConfigError(f"{where}: method must be one of {', '.join(PRESETS)}, got {c.method!r}")
    checks = ((c.steps >= 1, "steps must be >= 1"), (c.batch_size >= 1, "batch_size must be >= 1"),
              (c.k >= 1, "k must be >= 1"), (c.seed >= 0, "seed must be >= 0"),
              (0.0 <= c.learning_rate <= 10.0, "learning_rate must be in [0, 10] (0 = the method's own)"),
              (c.size == 0 or (c.size >= 32 and c.size % 8 == 0), "size must be 0 (the model's) or a multiple of 8, >= 32"),
              (c.if_exists in IF_EXISTS, f"if_exists must be one of {', '.join(IF_EXISTS)}"),
              (c.fit in FIT_MODES, f"fit must be one of {', '.join(FIT_MODES)}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}, got {getattr(c, message.split()[0])!r}")
