"""The end-of-run report: zero-shot numbers (CLIP_benchmark's JSON shape) and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.eval.zeroshot import evaluate_zeroshot
from vlp.train.metrics import read_metrics


def write_report(
    run_dir: Path,
    model: torch.nn.Module,
    bundle: Any,
    zeroshot_sets: dict[str, Path],
    *,
    batch_size: int,
) -> Path:
    """Evaluate zero-shot on each set, write `eval/<set>.json` and `report.md`; return its path."""
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    device = next(model.parameters()).device
    results: dict[str, dict[str, float]] = {}
    model.eval()
    for name, root in zeroshot_sets.items():
        metrics = evaluate_zeroshot(model, bundle.tokenizer, bundle.preprocess_val, root,
                                    device=device, batch_size=batch_size)
        results[name] = metrics
        record = {"dataset": name, "model": str(run_dir), "pretrained": None,
                  "task": "zeroshot_classification", "metrics": metrics}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    model.train()

    records = read_metrics(run_dir / "metrics.jsonl")
    lines = ["# vlp run report", "", f"Run folder: `{run_dir}`", ""]
    if records:
        first, last = records[0], records[-1]
        lines += [f"Trained {last['step']} steps, {last.get('samples_seen', '?')} samples; "
                  f"loss {first['loss']:.3f} (step {first['step']}) → {last['loss']:.3f}.", ""]
    lines += ["## Zero-shot classification", "", "| set | acc1 | acc5 | mean_per_class_recall |",
              "|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['acc1']:.4f} | {m['acc5']:.4f} | "
                     f"{m['mean_per_class_recall']:.4f} |")
    lines += ["", "![loss curve](loss_curve.png)", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return report
