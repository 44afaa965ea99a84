"""A federation's settings: what `prge federate` is given, and how they reach Flower's
ServerApp and ClientApps, as the run config (`flwr run --run-config`, keys as in
flower-app/pyproject.toml: the field names with dashes)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from runtime_driver.federation.protocol import DEFAULT_MAX_ABS_G, FederationConfig

METHODS = ("prge", "fedavg", "centralized")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def forward_rows(steps: int, num_queries: int, batch_size: int) -> int:
    """Rows of forward passes that many P-RGE steps run (2q copies of b rows each): what a
    federation and its centralized baseline are compared at."""
    return steps * 2 * num_queries * batch_size


@dataclass(frozen=True)
class FederationSettings:
    program: str  # the exported training program every participant runs
    out: str  # the server's run directory (rounds.jsonl, summary.json, adapter/, logs/)
    data: str = ""  # task folder or prepared task name ("": the default task)
    # prge: clients send (seed, g, lr), the round is replayed; fedavg (baseline): the same local
    # P-RGE steps, but clients send their adapters and Flower's FedAvg averages them;
    # centralized (baseline): one `prge train` run of clients * rounds * local_steps steps.
    method: str = "prge"
    aggregate: str = "sum"  # prge: how a round combines the clients' updates (ledger.combined)
    clients: int = 3
    rounds: int = 2
    local_steps: int = 10  # k: P-RGE steps each client runs per round
    lr: float = 1e-3
    eps: float = 1e-2
    seed: int = 0
    non_iid: bool = False  # shards by label instead of IID
    max_abs_g: float = DEFAULT_MAX_ABS_G
    timeout: float = 600.0  # seconds a round waits for replies
    eval_every: int = 0  # validate the global adapter every N rounds (0: only at the end)
    eval_examples: int = 500
    test_examples: int = 0

    def run_config(self) -> str:
        """`flwr run --run-config`: TOML values, the program and output folders as absolute paths."""
        def text(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):
                if '"' in v or " " in v:
                    raise ValueError(f"{v!r}: paths with spaces or quotes cannot pass through Flower's --run-config")
                return json.dumps(v)
            return repr(v)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(program=str(Path(self.program).resolve()), out=str(Path(self.out).resolve()))
        return " ".join(f"{name.replace('_', '-')}={text(v)}" for name, v in values.items())

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "FederationSettings":
        return cls(**{f.name: _TYPES[f.type](run_config[f.name.replace("_", "-")]) for f in fields(cls)})

    def coordinator(self) -> FederationConfig:
        return FederationConfig(self.clients, self.rounds, self.local_steps, self.lr, self.eps, self.seed, self.max_abs_g,
                                self.aggregate)
