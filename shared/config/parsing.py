"""Parsing: TOML / nested dicts / dotted overrides -> the spec dataclasses, with errors that name
the field; and the TOML writer for the configs a run records."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, get_type_hints

from .specs import ExperimentSpec

def _coerce(where: str, tp: Any, value: Any) -> Any:
    origin = getattr(tp, "__origin__", None)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        elem = getattr(tp, "__args__", (str,))[0]
        if elem is str:
            return tuple(str(v) for v in value)
        return tuple(_coerce(f"{where}[{i}]", elem, v) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], *, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that list the known ones."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown setting {prefix}{sorted(unknown)[0]}; known settings here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    defaults = {f.name: f.default_factory for f in fields(cls) if f.default_factory is not dataclasses.MISSING}
    for name, value in data.items():
        kwargs[name] = _coerce(f"{where}.{name}" if where else name, hints[name], value)
        if isinstance(value, dict) and dataclasses.is_dataclass(kwargs[name]) and name in defaults:
            # A section sets only what it names; the rest keeps this field's own default (e.g. the
            # personal recipe of ExperimentSpec.personal_train), not the section class's defaults.
            kwargs[name] = dataclasses.replace(defaults[name](), **{k: getattr(kwargs[name], k) for k in value})
    return cls(**kwargs)


def to_dict(spec: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) suitable for TOML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(spec))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (command-line `--set`) to a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.key=value, e.g. data.users=8")
        key, value = ov.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(value.strip())
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_config_file(
    path: str | Path | None, overrides: list[str] | None, build: Callable[[dict[str, Any]], Any]
) -> Any:
    """Read an optional TOML file, apply `section.key=value` overrides, build the typed spec.

    Every error names the file: a missing file, invalid TOML, or the field `build` rejects.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return build(data)
    except ValueError as e:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}{e}") from None


# Named recipes applied before a run's own overrides (`--preset NAME`). "paper": the personal
# recipe of OPPU (Tan et al. 2024) for 7B models, kept for comparison with the defaults, which
# were chosen for the embedded 135M model by `oppu sweep` on validation items (docs/quality.md).
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": (
        'personal_adapter.peft_type="lora"', "personal_adapter.r=8", "personal_adapter.alpha=8",
        "personal_adapter.dropout=0.05", 'personal_adapter.target_modules=["q_proj", "v_proj"]',
        "personal_train.lr=1e-4", "personal_train.epochs=2", "personal_train.weight_decay=0.0",
        "selection.enabled=false", 'retrieval.retriever="bm25"', "retrieval.k=1",
    ),
}


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentSpec:
    """Parse an experiment TOML file (optional) plus overrides into an ExperimentSpec."""
    return parse_config_file(path, overrides, lambda data: from_dict(ExperimentSpec, data))


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for our flat-section configs (tomllib reads, nothing in stdlib writes)."""
    lines: list[str] = []

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {val(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            for kk, vv in v.items():
                lines.append(f"{kk} = {val(vv)}")
    return "\n".join(lines) + "\n"
