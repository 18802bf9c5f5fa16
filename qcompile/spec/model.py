"""What model a command means: zoo.yaml entries, HF checkpoint directories and library manifests ->
validated `ModelSpec`s, by one resolution rule.

A MODEL argument is either a zoo name (`qwen2-debug`) or a directory holding an HF `config.json` (as
`save_pretrained` writes it, optionally with its safetensors). Both go through the family's schema, so
the same mistakes get the same one-line errors, naming the model (or file) and the field. Commands that
run a model (`run`) also take a LIBRARY directory: `resolve_runnable` says which one an argument is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from .. import data
from ..errors import UserError
from ..models import FAMILIES, Family, family_for_hf_type
from .schema import build_record, read_json_object

META_FIELDS = ("family", "description")  # model keys that are not config fields


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # zoo name, or the checkpoint directory's path
    family: Family
    config: Any  # the family's config record
    source: str  # where it was defined: "zoo.yaml" or ".../config.json"
    description: str = ""
    checkpoint: Path | None = None  # set when MODEL was a checkpoint directory

    @property
    def kind(self):
        """The family's Kind (decoder or encoder): what the model's entry points and runtime are."""
        return self.family.kind

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelSpec:
        """The model a library was built from, as its manifest records it."""
        model = manifest["model"]
        family = FAMILIES[model["family"]]
        config = build_record(family.config_class, model["config"], "manifest.json: model")
        return cls(model["name"], family, config, source=model["source"])


def _read_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: zoo file not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_zoo(*paths: Path) -> dict[str, ModelSpec]:
    """Every model of the zoo files (the built-in one, then the user's: `qcompile.data`), validated; the
    first problem is a UserError naming the file, model and field. A later file's family defaults add to
    the earlier ones; a later model of the same name replaces the earlier one. `paths`: read these files
instead."""
    families: dict[str, dict[str, Any]] = {}
    specs: dict[str, ModelSpec] = {}
    for path in paths or data.zoo_files():
        doc = _read_yaml(path)
        if not isinstance(doc, dict) or set(doc) - {"families", "models"}:
            raise UserError(f"{path}: top level must be a mapping with 'families' and 'models'")
        for fam_name, defaults in (doc.get("families") or {}).items():
            if fam_name not in FAMILIES:
                raise UserError(f"{path}: unknown family '{fam_name}' (known: {', '.join(FAMILIES)})")
            if not isinstance(defaults, dict):
                raise UserError(f"{path}: family '{fam_name}' must be a mapping of field defaults")
            known = {f.name for f in dataclasses.fields(FAMILIES[fam_name].config_class)}
            for key in defaults:
                if key not in known:
                    raise UserError(f"{path}: family '{fam_name}': unknown field '{key}'")
            inherited = families.get(fam_name, FAMILIES[fam_name].zoo_defaults)
            families[fam_name] = {**inherited, **defaults}
        for name, entry in (doc.get("models") or {}).items():
            specs[name] = _zoo_model(path, name, entry, families)
    return specs


def _zoo_model(path: Path, name: str, entry: Any, families: dict[str, dict[str, Any]]) -> ModelSpec:
    where = f"{path.name}: model '{name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: must be a mapping")
    fam_name = entry.get("family")
    if fam_name not in families:
        raise UserError(f"{where}: field 'family' must name a family of the zoo "
                        f"({', '.join(families)}), got {fam_name!r}")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: field 'description' must be str")
    fields = {**families[fam_name], **{k: v for k, v in entry.items() if k not in META_FIELDS}}
    family = FAMILIES[fam_name]
    config = build_record(family.config_class, fields, where)
    return ModelSpec(name, family, config, source=path.name, description=description)


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


def resolve_model(model: str | os.PathLike | ModelSpec) -> ModelSpec:
    """MODEL as the CLI and API take it: a directory with a config.json is a checkpoint, otherwise a zoo
    name (so `compile qwen2-debug -o qwen2-debug` can be run twice)."""
    if isinstance(model, ModelSpec):  # already resolved
        return model
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


def resolve_runnable(argument: str | os.PathLike) -> tuple[ModelSpec, Path | None]:
    """LIBRARY|MODEL, as `run` takes it: a directory with a library manifest is that library (the spec
    its manifest records, and its path); anything else is a MODEL (`resolve_model`; path None: its
    registry entry is meant)."""
    from ..build import library  # noqa: PLC0415

    path = Path(os.fspath(argument))
    if (path / library.MANIFEST).is_file():
        return ModelSpec.from_manifest(library.read_manifest(path)), path
    if looks_like_path(argument) and not path.exists():
        raise UserError(f"{path}: library directory not found")
    return resolve_model(argument), None


def model_summary(spec: ModelSpec) -> dict[str, Any]:
    """What `zoo show` prints: identity, config, and derived sizes."""
    return {"name": spec.name, "family": spec.family.name, "description": spec.description,
            "source": spec.source, "parameters": spec.family.parameter_count(spec.config),
            "config": dataclasses.asdict(spec.config)}
