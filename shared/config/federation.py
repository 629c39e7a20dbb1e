"""Federation settings (coordinator/, client/client_app.py, `oppu simulate`): an experiment plus
the rounds, and the Flower run-config form they travel in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .parsing import dump_toml, from_dict, parse_config_file, to_dict
from .specs import ExperimentSpec, TrainSpec, _choice, _positive

STRATEGIES = ("fedavg", "fedadam", "fedprox")
BASE_INITS = ("train", "fresh")


@dataclass(frozen=True)
class FederationSpec:
    """How the coordinator runs rounds over the users' machines (Flower)."""

    rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    fraction_train: float = field(
        default=1.0,
        metadata={"help": "Without DP: fraction of connected users sampled each round (at least min_clients). "
                          "Under DP: q, the probability with which each connected user takes part (Poisson)."},
    )
    min_clients: int = field(default=2, metadata={"help": "Users that must be connected before a round starts."})
    strategy: str = field(default="fedavg", metadata={"help": "fedavg | fedadam | fedprox (base-adapter aggregation)."})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx: weight of the proximal term mu/2·||w - w_global||²."})
    server_lr: float = field(default=1e-3, metadata={"help": "FedAdam: server learning rate (eta)."})
    server_beta1: float = field(default=0.9, metadata={"help": "FedAdam: first-moment decay."})
    server_beta2: float = field(default=0.99, metadata={"help": "FedAdam: second-moment decay."})
    server_tau: float = field(default=1e-3, metadata={"help": "FedAdam: adaptivity (epsilon) term."})
    ffa_lora: bool = field(
        default=False,
        metadata={"help": "FFA-LoRA: freeze the base adapter's LoRA A matrices, train and exchange only B."},
    )
    secagg: bool = field(default=False, metadata={"help": "Aggregate base-adapter updates with Flower's SecAgg+."})
    local_train: TrainSpec = field(
        default_factory=lambda: TrainSpec(epochs=1, lr=5e-4, batch_size=4),
        metadata={"help": "Each client's local training of the base adapter in a round."},
    )
    personal_refresh_epochs: float = field(
        default=1.0,
        metadata={"help": "Epochs that refresh an existing personal adapter in later rounds; 0 keeps it as is."},
    )
    base_init: str = field(
        default="train",
        metadata={"help": "train (on data.base_users, never evaluated, before round 1) | fresh (untrained)."},
    )
    evaluate_every: int = field(
        default=1, metadata={"help": "Evaluate the global base adapter every k rounds (0: only the final report)."}
    )
    round_timeout: float = field(default=1800.0, metadata={"help": "Seconds to wait for replies in one step."})
    chunk_mb: float = field(default=32.0, metadata={"help": "Size of one streamed artifact chunk, in MiB."})
    run_dir: str = field(
        default="", metadata={"help": "Run directory (checkpoint, reports, simulated users); empty: a new one."}
    )
    client_cache: str = field(
        default="",
        metadata={"help": "Simulation: the virtual clients' artifact cache; empty: $OPPU_CACHE/client-artifacts. "
                  "A deployed client ignores it: its own daemon.artifact_cache decides."},
    )
    sim_client_cpus: float = field(default=1.0, metadata={"help": "Simulation: CPU cores per virtual client."})
    sim_client_gpus: float = field(
        default=0.0,
        metadata={"help": "Simulation: GPU share per virtual client (0.25: four clients per GPU); Ray places "
                          "clients only on nodes that have it."},
    )
    ray_address: str = field(
        default="",
        metadata={"help": "Simulation: an existing Ray cluster to run the virtual clients on ('auto', 'HOST:6379'; "
                          "every node needs oppu installed and the run directory on a shared filesystem); "
                          "empty: a Ray instance of this machine's cores, started and stopped with the run."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the fixed-size client sampling of runs without DP, and of local example shuffles."}
    )
    sampling_seed: int = field(
        default=-1,
        metadata={"help": "Under DP: seed of the Poisson participation draw and of the server's noise, for "
                          "reproducible simulations (the epsilon then assumes the seed is secret); -1: the OS's "
                          "CSPRNG, as a deployment must use."},
    )
    max_update_norm: float = field(
        default=10.0,
        metadata={"help": "Without DP: the coordinator clips each update (new - global) to this L2 norm; 0: no bound. "
                          "Under DP the bound is privacy.clipping_norm."},
    )
    max_weight_ratio: float = field(
        default=4.0,
        metadata={"help": "Without DP: a reply's example count weighs at most this many times the round's "
                          "lower-median count in FedAvg; 0: every user weighs the same."},
    )
    report_client_metrics: bool = field(
        default=False,
        metadata={"help": "Under DP, deployed clients send per-user numbers (losses, example counts, scores) only "
                          "when this is true (they are outside the DP guarantee); simulated users always do."},
    )

    def __post_init__(self) -> None:
        _positive("federation.rounds", self.rounds)
        if self.sampling_seed < -1:
            raise ValueError(f"federation.sampling_seed={self.sampling_seed!r} must be -1 (secret randomness) or >= 0")
        for name in ("max_update_norm", "max_weight_ratio"):
            _positive(f"federation.{name}", getattr(self, name), allow_zero=True)
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"federation.fraction_train={self.fraction_train!r} must be in (0, 1]")
        _positive("federation.min_clients", self.min_clients)
        _choice("federation.strategy", self.strategy, STRATEGIES)
        _choice("federation.base_init", self.base_init, BASE_INITS)
        for name in ("proximal_mu", "personal_refresh_epochs", "evaluate_every"):
            _positive(f"federation.{name}", getattr(self, name), allow_zero=True)
        for name in ("server_lr", "server_tau", "round_timeout", "chunk_mb", "sim_client_cpus"):
            _positive(f"federation.{name}", getattr(self, name))
        _positive("federation.sim_client_gpus", self.sim_client_gpus, allow_zero=True)
        if self.ray_address.startswith("ray://"):
            raise ValueError(f"federation.ray_address={self.ray_address!r}: Ray Client (ray://) cannot host the "
                             "simulation's actors; run `oppu simulate` on a cluster node and give the GCS address "
                             "('auto' or 'HOST:6379')")
        for name in ("server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"federation.{name}={getattr(self, name)!r} must be in [0, 1)")


@dataclass(frozen=True)
class FederatedSpec:
    """One federated run: the experiment sections (data, model, adapters, training, retrieval,
    privacy, methods) plus [federation]. The TOML layout is an experiment file with a
    [federation] table; Flower's run-config holds the same keys flattened (`federation.rounds`)."""

    experiment: ExperimentSpec = field(default_factory=ExperimentSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)

    def __post_init__(self) -> None:
        p, f, e = self.experiment.privacy, self.federation, self.experiment
        dp = p.noise_multiplier > 0
        if dp and not p.federate_base_adapter:
            raise ValueError("privacy.noise_multiplier > 0 needs privacy.federate_base_adapter = true "
                             "(noise is added to the aggregated base-adapter updates)")
        if dp and f.strategy == "fedadam":
            raise ValueError("federation.strategy='fedadam' cannot be combined with privacy.noise_multiplier > 0: "
                             "Flower's DP wrapper adds noise after FedAdam's server step; choose fedavg or fedprox")
        if p.epsilon_budget and not dp:
            raise ValueError("privacy.epsilon_budget is set but privacy.noise_multiplier = 0 (no DP, epsilon is "
                             "infinite); set privacy.noise_multiplier > 0 or privacy.epsilon_budget = 0")
        if f.ffa_lora and e.base_adapter.peft_type != "lora":
            raise ValueError(f"federation.ffa_lora needs base_adapter.peft_type='lora', not {e.base_adapter.peft_type!r}")
        if f.secagg and not p.federate_base_adapter:
            raise ValueError("federation.secagg = true needs privacy.federate_base_adapter = true (nothing to aggregate)")
        if f.secagg and f.strategy == "fedadam":
            raise ValueError("federation.secagg supports fedavg and fedprox, not fedadam")

    @property
    def dp(self) -> bool:
        return self.experiment.privacy.noise_multiplier > 0


def _split_federated(data: dict[str, Any]) -> FederatedSpec:
    data = dict(data)
    fed = data.pop("federation", {})
    if not isinstance(fed, dict):
        raise ValueError(f"federation must be a table, got {type(fed).__name__}")
    experiment = from_dict(ExperimentSpec, data)
    return FederatedSpec(experiment, from_dict(FederationSpec, fed, where="federation"))


def load_federated(path: str | Path | None = None, overrides: list[str] | None = None) -> FederatedSpec:
    """Parse a federated-run TOML file (an experiment file plus [federation]) and overrides."""
    return parse_config_file(path, overrides, _split_federated)


def federated_to_dict(spec: FederatedSpec) -> dict[str, Any]:
    """Nested plain dict in the TOML layout (experiment sections at the top, [federation])."""
    out = to_dict(spec.experiment)
    out["federation"] = to_dict(spec.federation)
    return out


def to_run_config(spec: FederatedSpec) -> dict[str, bool | int | float | str]:
    """Flatten into Flower run-config entries (`section.key` -> scalar; lists as 'a,b')."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, (list, tuple)):
                flat[key] = ",".join(str(x) for x in v)
            else:
                flat[key] = v

    walk("", federated_to_dict(spec))
    return flat


def from_run_config(run_config: Any) -> FederatedSpec:
    """Parse Flower's (flat, dotted) run-config into a FederatedSpec, once per process."""
    nested: dict[str, Any] = {}
    for key, value in dict(run_config).items():
        parts = str(key).split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"run-config key {key!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    try:
        return _split_federated(nested)
    except ValueError as e:
        raise ValueError(f"Flower run-config: {e}") from None


def dump_federated_toml(spec: FederatedSpec) -> str:
    """The resolved run as TOML (`oppu simulate --config` reads it back)."""
    data = federated_to_dict(spec)
    fed = data.pop("federation")
    local = fed.pop("local_train")
    text = dump_toml({**data, "federation": fed})
    return text + "\n[federation.local_train]\n" + "".join(
        f"{k} = {dump_toml({k: v}).split(' = ', 1)[1]}" for k, v in local.items()
    )
