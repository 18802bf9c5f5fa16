"""zoo.yaml and HF checkpoint directories -> validated model specs.

A MODEL argument is either a zoo name (`qwen2-debug`) or a directory holding an HF `config.json` (as
`save_pretrained` writes it, optionally with its safetensors). Both go through the family's schema, so
the same mistakes get the same one-line errors, naming the model (or file) and the field.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .models import FAMILIES, Family, family_for_hf_type
from .schema import build_record, read_json_object

REPO_ROOT = Path(__file__).resolve().parent.parent
META_FIELDS = ("family", "description")  # model keys that are not config fields


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # zoo name, or the checkpoint directory's path
    family: Family
    config: Any  # the family's config record
    source: str  # where it was defined: "zoo.yaml" or ".../config.json"
    description: str = ""
    checkpoint: Path | None = None  # set when MODEL was a checkpoint directory


def zoo_path() -> Path:
    return Path(os.environ.get("QCOMPILE_ZOO", REPO_ROOT / "zoo.yaml"))


def _read_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: zoo file not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_zoo(path: Path | None = None) -> dict[str, ModelSpec]:
    """Every model of the zoo, validated; the first problem is a UserError naming model and field."""
    path = Path(path or zoo_path())
    doc = _read_yaml(path)
    if not isinstance(doc, dict) or set(doc) - {"families", "models"}:
        raise UserError(f"{path}: top level must be a mapping with 'families' and 'models'")
    families, models = doc.get("families") or {}, doc.get("models") or {}
    for fam_name, defaults in families.items():
        if fam_name not in FAMILIES:
            raise UserError(f"{path}: unknown family '{fam_name}' (known: {', '.join(FAMILIES)})")
        if not isinstance(defaults, dict):
            raise UserError(f"{path}: family '{fam_name}' must be a mapping of field defaults")
        known = {f.name for f in dataclasses.fields(FAMILIES[fam_name].config_class)}
        for key in defaults:
            if key not in known:
                raise UserError(f"{path}: family '{fam_name}': unknown field '{key}'")
    specs = {}
    for name, entry in models.items():
        where = f"{path.name}: model '{name}'"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: must be a mapping")
        fam_name = entry.get("family")
        if fam_name not in families:
            raise UserError(f"{where}: field 'family' must name a family of {path.name} "
                            f"({', '.join(families)}), got {fam_name!r}")
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise UserError(f"{where}: field 'description' must be str")
        fields = {**families[fam_name], **{k: v for k, v in entry.items() if k not in META_FIELDS}}
        family = FAMILIES[fam_name]
        config = build_record(family.config_class, fields, where)
        specs[name] = ModelSpec(name, family, config, source=path.name, description=description)
    return specs


def load_checkpoint_config(directory: Path) -> ModelSpec:
    """A model given as an HF checkpoint directory: its config.json through the family's schema."""
    directory = Path(directory)
    path = directory / "config.json"
    hf = read_json_object(path, missing=f"{directory}: not a model directory (no config.json)")
    model_type = hf.get("model_type")
    family = family_for_hf_type(model_type)
    if family is None:
        supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise UserError(f"{path}: model_type {model_type!r} is not supported "
                        f"(supported: {', '.join(supported)})")
    where = str(path)
    config = build_record(family.config_class, family.config_from_hf(hf, where, directory), where)
    return ModelSpec(str(directory), family, config, source=where, checkpoint=directory)


def looks_like_path(text: str | os.PathLike) -> bool:
    """A MODEL argument spelled as a path (not a zoo name), so a missing one is reported as a path."""
    text = os.fspath(text)
    return os.sep in text or text.startswith(".")


def resolve_model(model: str | os.PathLike) -> ModelSpec:
    """MODEL as the CLI and API take it: a directory with a config.json is a checkpoint, otherwise a zoo
    name (so `compile qwen2-debug -o qwen2-debug` can be run twice)."""
    text = os.fspath(model)
    if (Path(text) / "config.json").is_file():
        return load_checkpoint_config(Path(text))
    zoo = load_zoo()
    if text in zoo:  # a zoo name wins over a same-named directory that is not a checkpoint
        return zoo[text]
    if Path(text).is_dir():
        return load_checkpoint_config(Path(text))  # says what is missing
    if looks_like_path(text):
        raise UserError(f"{text}: no such model directory")
    raise UserError(f"unknown model '{text}' (not a directory; zoo models: {', '.join(zoo)})")


def model_summary(spec: ModelSpec) -> dict[str, Any]:
    """What `zoo show` prints: identity, config, and derived sizes."""
    from .weights import parameter_count  # noqa: PLC0415 (weights imports zoo's types)

    return {"name": spec.name, "family": spec.family.name, "description": spec.description,
            "source": spec.source, "parameters": parameter_count(spec),
            "config": dataclasses.asdict(spec.config)}
