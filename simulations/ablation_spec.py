"""Settings of the privacy ablation (`oppu ablate privacy`, simulations/ablation.py): a federated
run plus its [grid]."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import FederatedSpec, dump_federated_toml, dump_toml, from_dict, parse_config_file, to_dict
from shared.config.federation import _split_federated
from shared.config.specs import _choice, _positive

GRID_LAYOUTS = ("one-at-a-time", "full")


@dataclass(frozen=True)
class PrivacyGridSpec:
    """The cells of a privacy ablation. The first value of every axis makes the reference cell;
    "one-at-a-time" varies one axis at a time from it (as ablation tables do), "full" crosses all."""

    noise_multipliers: tuple[float, ...] = field(
        default=(0.0, 0.003, 0.03, 1.0), metadata={"help": "User-level DP noise multipliers z (0 = no noise)."})
    clipping_norms: tuple[float, ...] = field(default=(5.0,), metadata={"help": "L2 clip C of each user's update."})
    clients_per_round: tuple[int, ...] = field(default=(2,), metadata={"help": "Users sampled per round (m)."})
    populations: tuple[int, ...] = field(default=(4, 8), metadata={"help": "Users in the federation (N); q = m / N."})
    federate_base_adapter: tuple[bool, ...] = field(
        default=(True, False), metadata={"help": "Share base-adapter updates (false: nothing leaves a user)."})
    record_dp: tuple[bool, ...] = field(
        default=(False, True), metadata={"help": "Record-level DP-SGD on each user's local base-adapter training."})
    layout: str = field(default="one-at-a-time", metadata={"help": "one-at-a-time | full."})
    rounds: int = field(default=2, metadata={"help": "Federated rounds per cell."})
    holdout_users: int = field(default=4, metadata={"help": "Users never in any federation: the attack's non-members."})
    mia_records: int = field(default=32, metadata={"help": "At most this many members and as many non-members per attack."})
    reference_users: int = field(default=2, metadata={"help": "Unprotected personal adapters attacked for reference."})
    small_model_min_population: int = field(
        default=0, metadata={"help": "Cells with at least this many users run on the small model; 0 = never."})
    small_model: str = field(
        default="", metadata={"help": "The small model's directory; empty: a 2-layer random Llama with the base "
                              "model's tokenizer, made once and cached."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, noise, DP-SGD batches and the attack's records."})

    def __post_init__(self) -> None:
        _choice("grid.layout", self.layout, GRID_LAYOUTS)
        for name in ("noise_multipliers", "clipping_norms", "clients_per_round", "populations",
                     "federate_base_adapter", "record_dp"):
            if not getattr(self, name):
                raise ValueError(f"grid.{name} is empty; give at least one value")
        for z in self.noise_multipliers:
            _positive("grid.noise_multipliers[]", z, allow_zero=True)
        for c in self.clipping_norms:
            _positive("grid.clipping_norms[]", c)
        for name in ("rounds", "mia_records"):
            _positive(f"grid.{name}", getattr(self, name))
        for name in ("holdout_users", "reference_users", "small_model_min_population"):
            _positive(f"grid.{name}", getattr(self, name), allow_zero=True)
        if self.holdout_users == 0:
            raise ValueError("grid.holdout_users must be > 0: their records are the attack's non-members")
        for m in self.clients_per_round:
            _positive("grid.clients_per_round[]", m)
        if max(self.clients_per_round) > min(self.populations):
            raise ValueError(f"grid.clients_per_round={list(self.clients_per_round)} must not exceed the smallest "
                             f"population {min(self.populations)}")


@dataclass(frozen=True)
class AblationSpec:
    """A privacy ablation: the federated run every cell starts from, and the grid."""

    run: FederatedSpec = field(default_factory=FederatedSpec)
    grid: PrivacyGridSpec = field(default_factory=PrivacyGridSpec)


def load_ablation(path: str | Path | None = None, overrides: list[str] | None = None) -> AblationSpec:
    """Parse an ablation TOML file (a federated-run file plus [grid]) and overrides."""

    def build(data: dict[str, Any]) -> AblationSpec:
        data = dict(data)
        grid = data.pop("grid", {})
        if not isinstance(grid, dict):
            raise ValueError(f"grid must be a table, got {type(grid).__name__}")
        return AblationSpec(_split_federated(data), from_dict(PrivacyGridSpec, grid, where="grid"))

    return parse_config_file(path, overrides, build)


def dump_ablation_toml(spec: AblationSpec) -> str:
    """The resolved ablation as TOML (`oppu ablate privacy --config` and `oppu reproduce` read it)."""
    grid = dump_toml({"grid": to_dict(spec.grid)})
    return dump_federated_toml(spec.run) + "\n" + grid
