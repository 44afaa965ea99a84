"""`prge bench`: P-RGE's speed and memory claims, measured side by side on this machine.

All timings come from ONE process: the programs of a comparison are loaded together, their
calls are interleaved repetition by repetition (order alternating, so drift and a noisy
neighbour hit both sides alike) and medians are reported. Both thread pools (torch's and
ExecuTorch's own) are set to the same count and recorded. Peak memory is a per-process
high-water mark, so each engine runs in a separate worker process (bench_worker).

Programs are exported with only the methods a measurement needs and cached under
~/.cache/prge/bench/<key>/, the key covering the model weights, the shapes, the adapter and
the source of every module that shapes the program; a second `prge bench` re-exports nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from export.contract.manifest import FIRST_ORDER, FULL_MEZO, SIDE, TRAINING, package_versions, program_kind, read_manifest
from export.contract.memory_plan import MUTABLE_BUFFERS, planned_arenas
from export.contract.methods import step_scalars
from models.console import say
from models.files import cache_dir, write_json_atomic
from prge.pieces import DEFAULT_MICRO_BATCH
from runtime_driver.commands.bench_worker import plain_forward
from runtime_driver.engines import ExecuTorchProgram, program_adapter_config, set_runtime_threads
from runtime_driver.first_order_engine import ExecuTorchFirstOrder

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_METHODS = ("train_step",)
TRAIN_AND_FORWARD = ("train_step", "eval_logits")
SEQUENTIAL_METHODS = ("perturbed_loss",)
FORWARD_METHODS = ("eval_logits",)

TARGETS = {
    "parallel_speedup[4][1]": (">=", 2.0),
    "step_overhead": ("<=", 1.05),
    "et_vs_eager": ("<=", 0.8),
    "prge_rss_b64_over_b8": ("<=", 1.1),
    "prge_rss_over_first_order_b64": ("<=", 0.5),
    # The same claim against the strongest first-order a user would run (checkpointing plus
    # gradient accumulation, the leanest micro-batch measured).
    "prge_rss_over_lean_first_order_b64": ("<=", 0.5),
}


@dataclass
class BenchConfig:
    model: str | None = None  # model folder (default: SmolLM2-135M-Instruct)
    qs: tuple[int, ...] = (1, 2, 4, 8)  # parallel_speedup grid: queries per step
    bs: tuple[int, ...] = (1, 4)  # parallel_speedup grid: examples per perturbed copy
    seq_len: int = 64  # prompt length in tokens
    demo_q: int = 4  # the demo configuration: step_overhead, et_vs_eager, tokens/steps per s
    demo_b: int = 4
    rss_q: int = 4  # queries of the peak-RSS runs
    rss_batches: tuple[int, ...] = (8, 64)  # per-query batches of the peak-RSS runs
    threads: int = 2  # torch and ExecuTorch threads (the same for both)
    reps: int = 5  # timed repetitions per measurement (medians reported)
    warmup: int = 1  # untimed calls of each measurement first
    rss_steps: int = 1  # steps each memory worker runs
    # First-order baselines beside plain backprop: activation checkpointing plus gradient
    # accumulation over micro-batches of these many rows (P-RGE's piece size, and smaller).
    fo_micro_batches: tuple[int, ...] = (DEFAULT_MICRO_BATCH, 8)
    cache: str | None = None  # program cache root (default ~/.cache/prge/bench)
    skip_rss: bool = False
    micro_batch: int | None = DEFAULT_MICRO_BATCH  # most rows per forward pass in the P-RGE programs
    export_only: bool = False  # fill the program cache and stop (time later, on a quiet machine)
    profile: bool = False  # also an ETDump operator table of one demo-configuration train_step


# ---- programs ---------------------------------------------------------------------------
class ProgramCache:
    """Exports on first request, then serves the cached folder."""

    def __init__(self, model_dir: Path, cfg: BenchConfig) -> None:
        from export.contract.manifest import model_weights_hash, program_code_version

        self.model_dir = model_dir
        self.cfg = cfg
        self.root = Path(cfg.cache).expanduser() if cfg.cache else cache_dir() / "bench"
        self.identity = {
            "model": model_weights_hash(model_dir),
            "code": program_code_version(),  # any change to the traced source re-exports
            "versions": package_versions(),
            "seq_len": cfg.seq_len,
        }
        self.export_seconds: dict[str, float] = {}

    def get(self, q: int, b: int, methods: tuple[str, ...], eval_batch: int | None = None) -> Path:
        from export.contract.methods import ExportShapes
        from export.pipeline import export_model
        from models.causal_lm import AdapterConfig
        from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

        eval_batch = eval_batch or 2 * q * b
        spec = {**self.identity, "q": q, "b": b, "eval_batch": eval_batch, "methods": list(methods),
                "micro_batch": self.cfg.micro_batch}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        out = self.root / key / "program"
        name = f"q{q}-b{b}-{'+'.join(methods)}"
        if (out / "manifest.json").is_file():
            return out
        say(f"Exporting {name} (cached as {out}) ...")
        began = time.perf_counter()
        shapes = ExportShapes(b, self.cfg.seq_len, eval_batch)
        adapter = AdapterConfig(num_queries=q, micro_batch=self.cfg.micro_batch)
        export_model(self.model_dir, DEFAULT_SENTIMENT_TASK, adapter, shapes, out,
                     progress=lambda _: None, methods=methods)
        write_json_atomic(self.root / key / "spec.json", spec)
        self.export_seconds[name] = round(time.perf_counter() - began, 1)
        return out


# ---- timing -----------------------------------------------------------------------------
def interleaved_ms(calls: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, float]:
    """Median ms of each call; every repetition runs all calls, in alternating order."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(reps):
        order = list(calls) if rep % 2 == 0 else list(reversed(list(calls)))
        for name in order:
            began = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def _batch(rows: int, seq_len: int, vocab: int, seed: int = 0, targets: bool = False):
    from runtime_driver.commands.bench_worker import random_batch

    return random_batch(rows, seq_len, vocab, 2, seed, targets)


def _train_step_inputs(q: int, b: int, seq_len: int, vocab: int, targets: bool = False) -> list:
    ids, mask, labels = _batch(b, seq_len, vocab, targets=targets)
    # A nonzero g and lr: the folded update really changes B each call. The previous seed is the
    # new one, so every call after the first finds its update's directions kept by the call
    # before (PRGEStep.updated), as each step of a training run does.
    return [ids, mask, labels, *step_scalars(2, 2, [0.1] * q, 1e-4, 1e-2)]


def _train_step_call(program: ExecuTorchProgram, q: int, b: int, seq_len: int, vocab: int,
                     targets: bool = False) -> Callable[[], Any]:
    inputs = _train_step_inputs(q, b, seq_len, vocab, targets)
    return lambda: program.run("train_step", inputs)


def _sequential_call(program: ExecuTorchProgram, q: int, b: int, seq_len: int, vocab: int) -> Callable[[], Any]:
    """2q perturbed forwards of b rows (MeZO-style: +eps and -eps of q directions, one seed each)."""
    ids, mask, labels = _batch(b, seq_len, vocab)
    inputs = [
        [ids, mask, labels, torch.tensor([seed], dtype=torch.int64), torch.tensor([sign * 1e-2], dtype=torch.float32)]
        for seed in range(1, q + 1)
        for sign in (1.0, -1.0)
    ]

    def run() -> None:
        for args in inputs:
            program.run("perturbed_loss", args)

    return run


def _eager_step_call(model_dir: Path, q: int, b: int, seq_len: int, vocab: int, label_ids: list[int],
                     micro_batch: int | None) -> Callable[[], Any]:
    from models.causal_lm import AdapterConfig
    from runtime_driver.run import eager_engine

    engine = eager_engine(model_dir, AdapterConfig(num_queries=q, micro_batch=micro_batch), label_ids, seq_len)
    ids, mask, labels = _batch(b, seq_len, vocab)
    return lambda: engine.train_step(ids, mask, labels, 1, 2, [0.1] * q, 1e-4, 1e-2)


# ---- memory -----------------------------------------------------------------------------
def run_worker(args: list[str]) -> dict[str, Any]:
    """One bench_worker process; it reports its own VmHWM. (The kernel's ru_maxrss of a child is
    no use here: it keeps the high-water mark of the forked parent across exec, measured
    ~7 GB for every worker while the timing programs were loaded.)"""
    cmd = [sys.executable, "-m", "runtime_driver.commands.bench_worker", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the benchmark ----------------------------------------------------------------------
# CPU features that decide how fast XNNPACK's and torch's kernels are (a ratio such as
# et_vs_eager measured on one CPU does not carry over to another).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")


def machine_info() -> dict[str, Any]:
    """The CPU (model and vector extensions), memory, OS and package versions of a result."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.processor()):
                model = value.strip() or model
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gb, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    from transformers import AutoConfig

    from models.causal_lm import load_tokenizer
    from models.sources.packaged import resolve_model_dir
    from models.tasks.labels import label_token_ids
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

    model_dir = resolve_model_dir(cfg.model)
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    label_ids = label_token_ids(load_tokenizer(model_dir), DEFAULT_SENTIMENT_TASK)
    torch.set_num_threads(cfg.threads)
    set_runtime_threads(cfg.threads)
    cache = ProgramCache(model_dir, cfg)
    demo = (cfg.demo_q, cfg.demo_b)
    started = time.time()

    def prge_methods(q: int, b: int) -> tuple[str, ...]:
        # The demo program also serves the plain forward of step_overhead (same weights, same load).
        return TRAIN_AND_FORWARD if (q, b) == demo else TRAIN_METHODS

    # Export everything first, so no export runs between the timings.
    grid_programs = {(q, b): cache.get(q, b, prge_methods(q, b)) for q in cfg.qs for b in cfg.bs}
    demo_program = cache.get(*demo, prge_methods(*demo))
    sequential_programs = {b: cache.get(1, b, SEQUENTIAL_METHODS) for b in sorted(set(cfg.bs) | {cfg.demo_b})}
    # Memory runs use one program per method, so each measured process holds nothing of the
    # method it does not run.
    rss_programs = {} if cfg.skip_rss else {
        b: (cache.get(cfg.rss_q, b, TRAIN_METHODS), cache.get(cfg.rss_q, b, FORWARD_METHODS)) for b in cfg.rss_batches
    }
    if cfg.export_only:
        return {"programs": {"cache": str(cache.root), "code_hash": cache.identity["code"]}, "export_seconds": cache.export_seconds}

    say(f"Timing with {cfg.threads} thread(s), {cfg.reps} interleaved repetitions ...")
    sequential = {b: ExecuTorchProgram(path, SEQUENTIAL_METHODS) for b, path in sequential_programs.items()}
    grid_ms: dict[str, dict[str, dict[str, float]]] = {}
    speedup: dict[str, dict[str, float]] = {}
    for (q, b), path in grid_programs.items():
        program = ExecuTorchProgram(path, TRAIN_METHODS)
        ms = interleaved_ms(
            {
                "train_step": _train_step_call(program, q, b, cfg.seq_len, vocab),
                "sequential_2q_forwards": _sequential_call(sequential[b], q, b, cfg.seq_len, vocab),
            },
            cfg.reps, cfg.warmup,
        )
        del program
        grid_ms.setdefault(str(q), {})[str(b)] = {k: round(v, 2) for k, v in ms.items()}
        speedup.setdefault(str(q), {})[str(b)] = round(ms["sequential_2q_forwards"] / ms["train_step"], 3)
        say(f"  q={q} b={b}: train_step {ms['train_step']:.1f} ms, 2q sequential forwards "
            f"{ms['sequential_2q_forwards']:.1f} ms -> speedup {speedup[str(q)][str(b)]:.2f}")

    q, b = demo
    program = ExecuTorchProgram(demo_program, TRAIN_AND_FORWARD)
    forward_ids, forward_mask, _ = _batch(2 * q * b, cfg.seq_len, vocab)
    demo_ms = interleaved_ms(
        {
            "executorch_train_step": _train_step_call(program, q, b, cfg.seq_len, vocab),
            "executorch_forward_2qb_rows": lambda: program.run("eval_logits", [forward_ids, forward_mask]),
            "eager_train_step": _eager_step_call(model_dir, q, b, cfg.seq_len, vocab, label_ids, cfg.micro_batch),
        },
        cfg.reps, cfg.warmup,
    )
    del program
    step_ms = demo_ms["executorch_train_step"]
    say(f"  demo q={q} b={b}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in demo_ms.items()))

    profile = None
    if cfg.profile:
        from runtime_driver.commands.op_profile import profile_call

        say(f"ETDump profile of one train_step, q={q} b={b} ...")
        profile = profile_call(demo_program, "train_step", _train_step_inputs(q, b, cfg.seq_len, vocab), cfg.warmup)

    rss: dict[str, dict[str, float]] = {}
    if not cfg.skip_rss:
        say("Peak RSS, one process per engine ...")
        common = ["--threads", str(cfg.threads), "--seq-len", str(cfg.seq_len), "--steps", str(cfg.rss_steps)]
        for rss_b, (train_path, forward_path) in rss_programs.items():
            eager = ["--model", str(model_dir), "--label-ids", ",".join(map(str, label_ids)), "--q", str(cfg.rss_q), "--b", str(rss_b),
                     "--micro-batch", str(cfg.micro_batch or 0)]
            rows = {
                "executorch_prge": run_worker(["executorch-prge", "--program", str(train_path), *common]),
                "eager_prge": run_worker(["eager-prge", *eager, *common]),
                "eager_first_order": run_worker(["eager-fo", *eager, *common]),
                **{f"eager_first_order_ckpt_mb{m}": run_worker(["eager-fo", *eager, *common, "--checkpointing",
                                                                 "--fo-micro-batch", str(m)])
                   for m in cfg.fo_micro_batches},
                "executorch_inference": run_worker(["executorch-infer", "--program", str(forward_path), *common]),
            }
            rss[str(rss_b)] = {name: row["vm_hwm_mb"] for name, row in rows.items()}
            say(f"  b={rss_b}: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss[str(rss_b)].items()))

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine_info(),
        "threads": {"torch": torch.get_num_threads(), "executorch": cfg.threads},
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "cache"}, "model": str(model_dir)},
        "parallel_speedup": speedup,
        "step_overhead": round(step_ms / demo_ms["executorch_forward_2qb_rows"], 3),
        "et_vs_eager": round(step_ms / demo_ms["eager_train_step"], 3),
        "peak_rss_mb": rss,
        "profile": profile,
        "tokens_per_s": round(2 * q * b * cfg.seq_len / (step_ms / 1000), 1),
        "steps_per_s": round(1000 / step_ms, 4),
        "timings_ms": {"grid": grid_ms, "demo": {k: round(v, 2) for k, v in demo_ms.items()}},
        "export_seconds": cache.export_seconds,
        "programs": {"cache": str(cache.root), "code_hash": cache.identity["code"]},
        "notes": {
            "parallel_speedup": "2q sequential perturbed_loss calls at batch b / one train_step over 2q*b rows, same runtime",
            "step_overhead": "train_step / eval_logits over the same 2q*b rows and weights (plain forward)",
            "tokens_per_s": "prompt tokens through the forward per second: 2q*b*seq_len / train_step time",
            "peak_rss_mb": f"VmHWM of one process per engine; q={cfg.rss_q}; keys are per-query batch b "
                           f"(P-RGE forwards 2q*b rows, first-order backprops b rows); inference = eval_logits on 2q*b rows; "
                           f"eager_first_order_ckpt_mbM = activation checkpointing + gradients accumulated over M-row micro-batches",
        },
    }
    result["targets"] = target_status(result)
    return result


def _rss_ratios(rss: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """Largest over smallest measured batch (8 and 64 by default, as the target names say)."""
    batches = sorted(rss, key=int)
    low, high = (rss[batches[0]], rss[batches[-1]]) if len(batches) > 1 else (None, None)
    lean = min((v for k, v in high.items() if k.startswith("eager_first_order_ckpt")), default=None) if high else None
    return {
        "prge_rss_b64_over_b8": round(high["executorch_prge"] / low["executorch_prge"], 3) if low and high else None,
        "prge_rss_over_first_order_b64": round(high["executorch_prge"] / high["eager_first_order"], 3) if high else None,
        "prge_rss_over_lean_first_order_b64": round(high["executorch_prge"] / lean, 3) if lean else None,
    }


def target_status(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    values = {
        "parallel_speedup[4][1]": result["parallel_speedup"].get("4", {}).get("1"),
        "step_overhead": result["step_overhead"],
        "et_vs_eager": result["et_vs_eager"],
        **_rss_ratios(result["peak_rss_mb"]),
    }
    status = {}
    for name, (op, bound) in TARGETS.items():
        value = values.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        status[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return status


def format_table(result: dict[str, Any]) -> str:
    speedup = result["parallel_speedup"]
    bs = sorted({b for row in speedup.values() for b in row}, key=int)
    lines = [f"parallel_speedup (2q sequential forwards at batch b / one P-RGE train_step), "
             f"{result['threads']['executorch']} thread(s)"]
    lines.append("q \\ b " + "".join(f"{'b=' + b:>10}" for b in bs))
    for q in sorted(speedup, key=int):
        lines.append(f"{'q=' + q:<6}" + "".join(f"{speedup[q].get(b, float('nan')):>10.2f}" for b in bs))
    demo = result["timings_ms"]["demo"]
    lines.append("")
    lines.append(f"demo q={result['config']['demo_q']} b={result['config']['demo_b']} T={result['config']['seq_len']}: "
                 + ", ".join(f"{k} {v:.0f} ms" for k, v in demo.items()))
    lines.append(f"tokens_per_s {result['tokens_per_s']:.0f}   steps_per_s {result['steps_per_s']:.3f}")
    if result["peak_rss_mb"]:
        engines = list(next(iter(result["peak_rss_mb"].values())))
        lines.append("")
        lines.append(f"{'peak RSS MB':<14}" + "".join(f"{e:>22}" for e in engines))
        for b, row in result["peak_rss_mb"].items():
            lines.append(f"{'b=' + b:<14}" + "".join(f"{row[e]:>22.0f}" for e in engines))
    if result.get("profile"):
        from runtime_driver.commands.op_profile import format_profile

        lines.append("")
        lines.append(format_profile(result["profile"]))
    lines.append("")
    lines.append(f"{'target':<32}{'value':>10}{'goal':>10}  met")
    for name, t in result["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"{name:<32}{value:>10}{t['target']:>10}  {met}")
    return "\n".join(lines)


def compare_programs(program_dirs: list[str], reps: int = 5, warmup: int = 1, threads: int = 2,
                     rss: bool = True) -> dict[str, dict[str, Any]]:
    """Several exports of the same shapes side by side: train_step and plain-forward medians (ms),
    interleaved in one process, then each program's peak RSS over two train_steps in a process
    of its own, and its size. A before/after measurement of a change to the exported code, of
    one model stored several ways (float32 and quantized bases), or of a completion task's step
    beside a classification one: ratios are to the first. The plain forward is eval_logits, or
    a completion program's eval_losses (the same forward, scored at its completion positions).
    A first-order program (`prge export --first-order`) is timed by its whole step (forward,
    backward, SGD); it has no plain forward of its own, so no step_overhead. A full-parameter
    MeZO program (`prge export --mezo-full`) is timed like a P-RGE one (q = 1). A side-tuning
    device program (`prge side-tune`'s device-program/) is timed by its one forward, side_features,
    in the train_step column: that forward is all the device does for an example."""
    torch.set_num_threads(threads)
    set_runtime_threads(threads)
    calls: dict[str, Callable[[], Any]] = {}
    keep = []
    for path in program_dirs:
        if program_kind(read_manifest(path)) == FIRST_ORDER:
            engine = ExecuTorchFirstOrder(path)
            keep.append(engine)
            _, vocab, _ = plain_forward(engine.manifest)
            batch = _batch(engine.batch_size, engine.seq_len, vocab)
            calls[f"{path}:train_step"] = lambda e=engine, b=batch: e.first_order_step(*b, lr=1e-3)
            continue
        if program_kind(read_manifest(path)) == SIDE:
            program = ExecuTorchProgram(Path(path), methods=("side_features",))
            keep.append(program)
            ids, mask, _ = _batch(program.manifest["shapes"]["batch_size"], program.manifest["shapes"]["seq_len"],
                                  plain_forward(program.manifest)[1])
            calls[f"{path}:train_step"] = lambda p=program, i=ids, m=mask: p.run("side_features", [i, m])
            continue
        program = ExecuTorchProgram(Path(path))  # the training methods of its task's kind
        keep.append(program)
        manifest = program.manifest
        forward, vocab, completion = plain_forward(manifest)
        q, shapes = manifest["num_queries"], manifest["shapes"]
        ids, mask, labels = _batch(shapes["eval_batch_size"], shapes["seq_len"], vocab, targets=completion)
        inputs = [ids, mask, labels] if completion else [ids, mask]
        calls[f"{path}:train_step"] = _train_step_call(program, q, shapes["batch_size"], shapes["seq_len"], vocab, completion)
        calls[f"{path}:eval_logits"] = lambda p=program, f=forward, i=inputs: p.run(f, i)
    ms = interleaved_ms(calls, reps, warmup)
    manifests = {path: program.manifest for path, program in zip(program_dirs, keep)}
    del keep, calls  # the RSS workers measure one program each; nothing here should crowd them
    rows: dict[str, dict[str, Any]] = {}
    for path in program_dirs:
        m = manifests[path]
        files, kind = m["program"], program_kind(m)
        first_order, side = kind == FIRST_ORDER, kind == SIDE
        plain = None if first_order or side else ms[f"{path}:eval_logits"]
        adapter = program_adapter_config(m) if kind == TRAINING else None
        rows[path] = {
            "method": {FIRST_ORDER: "first-order (SGD)", FULL_MEZO: "full-parameter MeZO",
                       SIDE: "side tuning (device forward)"}.get(kind, "P-RGE"),
            "rows_per_step": m["shapes"]["batch_size"] * (1 if first_order or side else 2 * m["num_queries"]),
            "quantization": adapter.quantize if adapter else "none",
            "estimator": adapter.estimator if adapter else ("spsa" if kind == FULL_MEZO else "-"),
            # Every file the device needs: .pte, .ptd, a full-parameter program's initial weights.
            "program_mb": round(sum(files[key]["bytes"] for key in ("pte", "ptd", "weights") if files.get(key)) / 1e6, 1),
            # What the runtime allocates besides the program's files: each method's planned arena
            # (the largest is what a step can need at once) and the shared mutable state.
            "planned_arena_mb": {k: round(v / 1e6, 1) for k, v in planned_arenas(Path(path) / files["pte"]["file"]).items()},
            "train_step_ms": round(ms[f"{path}:train_step"], 3), "eval_logits_ms": plain and round(plain, 3),
            "step_overhead": plain and round(ms[f"{path}:train_step"] / plain, 3),
        }
        worker = run_worker([{FIRST_ORDER: "executorch-fo", SIDE: "executorch-infer"}.get(kind, "executorch-prge"),
                             "--program", str(path), "--steps", "2", "--threads", str(threads)]) if rss else {}
        rows[path]["peak_rss_train_step_mb"] = worker.get("vm_hwm_mb")
        rows[path]["rss_phases"] = worker.get("phases", [])  # where the peak comes from
    first = rows[program_dirs[0]]
    for row in rows.values():
        row["train_step_vs_first"] = round(row["train_step_ms"] / first["train_step_ms"], 3)
        row["rss_vs_first"] = round(row["peak_rss_train_step_mb"] / first["peak_rss_train_step_mb"], 3) if rss else None
    return rows


def format_programs(rows: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table of `prge bench --programs` (markdown)."""
    lines = ["| program | method | rows per step | base | estimator | program MB | largest planned arena MB | "
             "peak RSS train_step MB | train_step ms | eval_logits ms | step_overhead | step vs first | RSS vs first |",
             "|" + "---|" * 13]
    for path, r in rows.items():
        arenas = {k: v for k, v in r["planned_arena_mb"].items() if k != MUTABLE_BUFFERS}
        largest = max(arenas, key=arenas.get)
        rss = "-" if r["peak_rss_train_step_mb"] is None else f"{r['peak_rss_train_step_mb']:,.0f}"
        ratio = "-" if r["rss_vs_first"] is None else f"{r['rss_vs_first']:.2f}"
        plain = "-" if r["eval_logits_ms"] is None else f"{r['eval_logits_ms']:,.0f}"
        overhead = "-" if r["step_overhead"] is None else f"{r['step_overhead']:.3f}"
        lines.append(f"| {path} | {r['method']} | {r['rows_per_step']} | {r['quantization']} | {r['estimator']} | "
                     f"{r['program_mb']:,.1f} | {arenas[largest]:,.1f} ({largest}) | {rss} | {r['train_step_ms']:,.0f} | {plain} | {overhead} | "
                     f"{r['train_step_vs_first']:.2f} | {ratio} |")
    phases = [(path, row) for path, r in rows.items() for row in r.get("rss_phases", [])]
    if phases:
        lines += ["", "Memory by phase (the peak RSS process: resident after the phase, of it allocated and "
                  "mapped from files, and the peak so far):", "",
                  "| program | phase | RSS MB | allocated MB | file-mapped MB | peak so far MB |", "|---|---|---|---|---|---|"]
        lines += [f"| {path} | {row['phase']} | {row['rss_mb']:,.0f} | {row['anon_mb']:,.0f} | {row['file_mb']:,.0f} | "
                  f"{row['peak_mb']:,.0f} |" for path, row in phases]
    return "\n".join(lines)
