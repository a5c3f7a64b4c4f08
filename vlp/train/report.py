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
    training: dict[str, int] = {}
    if records:
        first, last = records[0], records[-1]
        training = {k: last[k] for k in ("step", "samples_seen", "skipped_samples") if k in last}
        lines += [f"Trained {last['step']} steps, {last.get('samples_seen', '?')} samples; "
                  f"loss {first['loss']:.3f} (step {first['step']}) → {last['loss']:.3f}.", "",
                  f"Skipped {last.get('skipped_samples', '?')} unusable training samples "
                  "(each is logged with its shard and key; `vlp shards validate` lists them).",
                  ""]
    lines += ["## Zero-shot classification", ""]
    if results:
        lines += ["Sets: " + ", ".join(f"`{name}` ({root})" for name, root in
                                        zeroshot_sets.items()), "",
                  "| set | acc1 | acc5 | mean_per_class_recall |", "|---|---|---|---|"]
    else:
        lines += ["No zero-shot set was evaluated: this run trained on your own data and "
                  "`eval.zeroshot` is not set. Add one with `eval.zeroshot=FOLDER` (a "
                  "CLIP_benchmark-layout folder: classnames.txt, "
                  "zeroshot_classification_templates.txt, test/*.tar), or run a suite with "
                  "`eval.suite=...` or `vlp eval --checkpoint RUN_FOLDER`."]
    for name, m in results.items():
        lines.append(f"| {name} | {m['acc1']:.4f} | {m['acc5']:.4f} | "
                     f"{m['mean_per_class_recall']:.4f} |")
    lines += ["", "![loss curve](loss_curve.png)", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    # one entry per zero-shot set, plus `train`: step, samples_seen, skipped_samples
    (run_dir / "results.json").write_text(json.dumps({**results, "train": training}, indent=1))
    return report
