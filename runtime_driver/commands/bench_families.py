"""`prge bench --families`: what each architecture family costs to export, on tiny random weights.

Every family prge tests gets the same tiny model (models/sources/tiny.py: 2 layers, width 64,
random weights) and the same export (the default task, q, b, T). Per family: the export's wall
time (tracing, lowering, serialization: the manifest's stages), the XNNPACK subgraphs ("delegate
islands") and the nodes left to the portable ops per method, and what the rewrites replaced.
The sizes are the tiny configs', so the islands say how a family's layers lower, not how fast a
real model of that family trains (the real models have their own rows in BENCHMARKS.md).

All exports run in one process; the first family is exported twice and its first (cold: one-time
compilation and imports) export is discarded, so every row is a warm export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from models.console import say
from models.files import cache_dir

REPORTED_METHODS = ("train_step", "eval_logits")


def _export(model_dir: Path, out: Path, q: int, b: int, seq_len: int) -> dict[str, Any]:
    from export.contract.methods import ExportShapes
    from export.pipeline import export_model
    from models.causal_lm import AdapterConfig
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

    return export_model(model_dir, DEFAULT_SENTIMENT_TASK, AdapterConfig(num_queries=q), ExportShapes(b, seq_len, 2 * q * b),
                        out, progress=lambda _: None)


def family_row(family: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """One table row, read from the export's manifest (nothing measured twice)."""
    rewritten = manifest["model"]["rewritten"]
    row: dict[str, Any] = {
        "family": family,
        "model_type": manifest["model"]["model_type"],
        "export_s": manifest["export_seconds"]["total_s"],
        "pte_mb": round(manifest["program"]["pte"]["bytes"] / 1e6, 2),
        "rms_norms_rewritten": rewritten["rms_norms"],
        "attention": rewritten["attention"],
        "kept": rewritten["kept"],
    }
    for method in REPORTED_METHODS:
        d = manifest["delegation"][method]
        row[method] = {"delegated_subgraphs": d["delegated_subgraphs"], "delegated_nodes": d["delegated_nodes"],
                       "portable_nodes": d["portable_nodes"]}
    return row


def bench_families(families: tuple[str, ...], cache: str | None = None, q: int = 4, b: int = 4,
                   seq_len: int = 64) -> dict[str, Any]:
    from models.sources.tiny import TINY_FAMILIES, make_tiny_model_dir

    unknown = [f for f in families if f not in TINY_FAMILIES]
    if unknown or not families:  # before any export, not after the first few
        raise ValueError(f"--families: unknown tiny family {unknown[0]!r}; choose from {', '.join(TINY_FAMILIES)}"
                         if unknown else "--families: name at least one family")
    root = (Path(cache).expanduser() if cache else cache_dir() / "bench") / "families"
    rows = []
    for i, family in enumerate(families):
        model_dir = make_tiny_model_dir(family, root / family / "model", seed=0)
        out = root / family / "program"
        if i == 0:
            say(f"Warm-up export ({family}, discarded) ...")
            _export(model_dir, out, q, b, seq_len)
        say(f"Exporting tiny {family} ({i + 1}/{len(families)}) ...")
        rows.append(family_row(family, _export(model_dir, out, q, b, seq_len)))
    return {"config": {"q": q, "b": b, "seq_len": seq_len, "tiny": "2 layers, width 64, random weights"},
            "families": rows}


def format_families(result: dict[str, Any]) -> str:
    """The markdown table BENCHMARKS.md shows."""
    head = ("| family | model_type | export s | train_step subgraphs / portable nodes | "
            "eval_logits subgraphs / portable nodes | RMSNorms rewritten | attention | kept as written |")
    lines = [head, "|" + "---|" * 8]
    for r in result["families"]:
        norms = ", ".join(f"{n} ({form})" for form, n in r["rms_norms_rewritten"].items()) or "-"
        kept = ", ".join(sorted(r["kept"])) or "-"
        cells = [r["family"], r["model_type"], f"{r['export_s']:.1f}",
                 *(f"{r[m]['delegated_subgraphs']} / {r[m]['portable_nodes']}" for m in REPORTED_METHODS),
                 norms, r["attention"], kept]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
