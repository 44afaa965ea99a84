"""`prge side-tune` (models/side_network.py): the device's forward passes over a split through
an exported program, sent as int8 wire features; the server's first-order training of the side
network on them; then the program of base + side network that the device predicts with.

run/ holds config.json, device-program/ (features only), the server's view of what was sent
(wire/<split>.safetensors: int8 codes, scales, base logits, labels), metrics.jsonl (one row per
epoch), side_network.safetensors + side_network.json, program/ (base + side network) and
summary.json.

The frozen model never changes, so each example costs the device ONE forward pass in the whole
run, however many epochs the server trains: that is where the design's speed comes from, and
also why its bytes sent grow with the data, not with the steps.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from export.contract.manifest import SIDE, ManifestError, program_kind
from models.console import say
from models.files import write_json_atomic
from models.side_network import SideNetwork, WireFeatures, quantize_taps, split_features
from models.tasks.batches import TokenizedSplit
from runtime_driver.engines import ExecuTorchProgram
from runtime_driver.evaluate import eval_batches, evaluate

FeatureRows = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> SideFeatures' rows


def device_features(features: FeatureRows, split: TokenizedSplit, batch_size: int, fixed_batch: bool,
                    num_taps: int, hidden_size: int) -> WireFeatures:
    """What the device sends for a split: one forward per example, quantized per (row, tap)."""
    parts = []
    for rows, (ids, mask) in eval_batches([split.input_ids, split.attention_mask], batch_size, fixed_batch):
        taps, base = split_features(features(ids, mask)[:rows], num_taps, hidden_size)
        parts.append(quantize_taps(taps, base))
    return WireFeatures(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                        torch.cat([p.base_logits for p in parts]))


@dataclass
class SideTrainConfig:
    epochs: int = 20
    lr: float = 1e-3  # Adam
    batch_size: int = 32
    width: int = 64
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class SideHistory:
    """Per epoch: the mean training loss and the validation accuracy / loss after it."""

    rows: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def label_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """{"accuracy", "loss"} of label-word logits [n, num_labels] (as evaluate() computes them)."""
    logits = logits.to(torch.float64)
    return {"accuracy": float((logits.argmax(dim=1) == labels).to(torch.float64).mean()),
            "loss": float(F.cross_entropy(logits, labels))}


def side_metrics(side: SideNetwork, wire: WireFeatures, labels: Tensor) -> dict[str, float]:
    """label_metrics of the side network on wire features (the server's view)."""
    with torch.no_grad():
        return label_metrics(side(wire.taps(), wire.base_logits), labels)


def train_side_network(train: WireFeatures, train_labels: Tensor, validation: WireFeatures, validation_labels: Tensor,
                       config: SideTrainConfig, progress: Callable[[dict[str, Any]], Any] = lambda row: None,
                       ) -> tuple[SideNetwork, SideHistory]:
    """Adam on the cross-entropy over the label words, minibatches reshuffled each epoch (seeded);
    validation after every epoch (epoch 0: untrained, the frozen model's own predictions). The
    network returned is the epoch's with the lowest validation loss (the server can afford to keep
    it: early stopping, as a user of first-order training would); history.best_epoch says which."""
    if len(train_labels) != train.codes.shape[0] or len(validation_labels) != validation.codes.shape[0]:
        raise ValueError("one label per example of the wire features")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the side network's initial weights
    _, num_taps, hidden = train.codes.shape
    side = SideNetwork(num_taps, hidden, train.base_logits.shape[1], config.width)
    optimizer = torch.optim.Adam(side.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    taps, base = train.taps(), train.base_logits
    history = SideHistory()
    history.rows.append({"epoch": 0, "train_loss": float("nan"),
                         **{f"val_{k}": v for k, v in side_metrics(side, validation, validation_labels).items()}})
    progress(history.rows[-1])
    best = {k: v.clone() for k, v in side.state_dict().items()}
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(train_labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = F.cross_entropy(side(taps[idx], base[idx]), train_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch, "train_loss": total / len(order),
               **{f"val_{k}": v for k, v in side_metrics(side, validation, validation_labels).items()}}
        history.rows.append(row)
        progress(row)
        if row["val_loss"] < history.rows[history.best_epoch]["val_loss"]:
            history.best_epoch = epoch
            best = {k: v.clone() for k, v in side.state_dict().items()}
    side.load_state_dict(best)
    side.eval()
    return side, history


class ExecuTorchSide:
    """A side-tuning program through the ExecuTorch runtime: side_features (and, once trained,
    side_logits) over a fixed batch of rows."""

    fixed_eval_batch = True

    def __init__(self, program_dir: str | Path) -> None:
        self.program = ExecuTorchProgram(program_dir)
        m = self.manifest = self.program.manifest
        if program_kind(m) != SIDE:
            raise ManifestError(f"{program_dir}: a {program_kind(m)} program, not a side-tuning one (`prge side-tune` exports those)")
        self.batch_size = int(m["shapes"]["batch_size"])
        self.seq_len = int(m["shapes"]["seq_len"])
        self.taps = tuple(m["side"]["taps"])
        self.hidden_size = int(m["side"]["hidden_size"])
        self.trained = m["side"]["network"] is not None
        self.forward_ms: list[float] = []  # per side_features call: the device's cost

    def _check(self, input_ids: Tensor) -> None:
        if tuple(input_ids.shape) != (self.batch_size, self.seq_len):
            raise ValueError(f"the program takes [{self.batch_size}, {self.seq_len}] token ids, got {list(input_ids.shape)}")

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._check(input_ids)
        began = time.perf_counter()
        rows = self.program.run("side_features", [input_ids, attention_mask])
        self.forward_ms.append((time.perf_counter() - began) * 1e3)
        return rows

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._check(input_ids)
        return self.program.run("side_logits", [input_ids, attention_mask])


@dataclass
class SideTuneConfig:
    model: str | None = None
    data: str | None = None
    out: str = "runs/side"
    batch_size: int = 8  # rows per device forward (fixed at export)
    seq_len: int = 64
    taps: tuple[int, ...] | None = None  # None: default_taps of the model
    train_examples: int | None = None  # None: the whole train split
    eval_examples: int = 200  # validation rows the server watches per epoch
    test_examples: int | None = None  # None: the whole test split
    train: SideTrainConfig = field(default_factory=SideTrainConfig)


def _save_wire(path: Path, wire: WireFeatures, labels: Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"codes": wire.codes, "scales": wire.scales, "base_logits": wire.base_logits, "labels": labels},
              str(path), metadata={"format": "prge-side-wire"})


def side_tune(cfg: SideTuneConfig, progress: Callable[[str], Any] = say, quiet: bool = False) -> dict[str, Any]:
    """The whole job; returns (and writes) the summary. quiet: no progress bars."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from export.side_tune import export_side_program
    from models.causal_lm import load_tokenizer
    from models.sources.packaged import resolve_model_dir
    from models.tasks.folder import load_folder_spec, load_task, resolve_data_dir
    from runtime_driver.metrics import MetricsLog

    if cfg.batch_size < 1 or cfg.eval_examples < 1:
        raise ValueError("--batch and --eval-examples must be >= 1")
    model_dir, data_dir = resolve_model_dir(cfg.model, progress), resolve_data_dir(cfg.data, progress)
    spec = load_folder_spec(data_dir)
    if spec.loss != "classification":
        raise ValueError(f"{data_dir}: side tuning trains label-word tasks (classification loss); this task's is {spec.loss!r}")
    task = load_task(spec, load_tokenizer(model_dir), data_dir)
    splits = {"train": task.split("train", cfg.seq_len, cfg.train_examples),
              "validation": task.split("validation", cfg.seq_len, cfg.eval_examples),
              "test": task.split("test", cfg.seq_len, cfg.test_examples)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {**asdict(cfg), "model_dir": str(model_dir), "data_dir": str(data_dir)})

    progress("Device: exporting the frozen model's forward (side_features) ...")
    export_side_program(model_dir, spec, cfg.batch_size, cfg.seq_len, out / "device-program", cfg.taps, progress=progress)
    device = ExecuTorchSide(out / "device-program")
    sent: dict[str, WireFeatures] = {}
    (out / "wire").mkdir(exist_ok=True)
    for name, split in splits.items():
        with tqdm(total=-(-len(split) // device.batch_size), desc=f"device forwards ({name})", unit="batch",
                  disable=quiet, dynamic_ncols=True) as bar:
            def counted(ids: Tensor, mask: Tensor) -> Tensor:
                bar.update(1)
                return device.features(ids, mask)

            sent[name] = device_features(counted, split, device.batch_size, True, len(device.taps), device.hidden_size)
        _save_wire(out / "wire" / f"{name}.safetensors", sent[name], split.labels)
    forward_ms = statistics.median(device.forward_ms)

    progress(f"Server: training the side network ({cfg.train.epochs} epochs, Adam lr {cfg.train.lr:g}) ...")
    log = MetricsLog(out / "metrics.jsonl")
    began = time.perf_counter()
    try:
        side, history = train_side_network(sent["train"], splits["train"].labels, sent["validation"], splits["validation"].labels,
                                           cfg.train, progress=lambda row: log.write({"type": "epoch", **row}))
    finally:
        log.close()
    server_seconds = time.perf_counter() - began
    save_file(side.state_dict(), str(out / "side_network.safetensors"), metadata={"format": "pt"})
    write_json_atomic(out / "side_network.json", side.config())

    progress("Device: exporting base + side network (side_logits) ...")
    export_side_program(model_dir, spec, cfg.batch_size, cfg.seq_len, out / "program", device.taps, side, progress=progress)
    tuned = ExecuTorchSide(out / "program")
    test = evaluate(tuned.logits, splits["test"], tuned.batch_size, True)
    zero_shot = label_metrics(sent["test"].base_logits, splits["test"].labels)  # float32 on the wire, as computed
    summary = {
        "method": "side-tune",
        "taps": list(device.taps),
        "bytes_sent_per_example": sent["train"].bytes_per_example(),
        "examples_sent": {name: len(split) for name, split in splits.items()},
        "device_forward_ms_median": round(forward_ms, 2),
        "device_rows_per_forward": device.batch_size,
        "server_train_seconds": round(server_seconds, 2),
        "side_network_parameters": sum(p.numel() for p in side.parameters()),
        "best_epoch": history.best_epoch,
        "validation": history.rows,
        "zero_shot_test": zero_shot,
        "test": test,
        "test_server_view": side_metrics(side, sent["test"], splits["test"].labels),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
