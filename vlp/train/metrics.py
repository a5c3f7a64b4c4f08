"""Metric sinks and the loss-curve plot.

`JSONLTracker` is an accelerate tracker writing one JSON object per logged step to
`metrics.jsonl`, so `accelerator.log` reaches it beside TensorBoard, W&B, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process


class JSONLTracker(GeneralTracker):
    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    # No `on_main_process` on __init__: it would create accelerate's PartialState before the
    # Accelerator does, with the wrong settings. The file is opened on the first log instead.
    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.file = None

    @property
    def tracker(self):
        return self.file

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is written as config.yaml beside metrics.jsonl

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    @on_main_process
    def finish(self) -> None:
        if self.file is not None:
            self.file.close()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """One record per step of a metrics.jsonl: records of one step (training metrics, eval
    metrics) are merged, and a resumed run's repeated steps keep the newest values."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Plot every `loss*` series and the temperature against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({k for r in records for k in r if k.startswith("loss")})
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax_loss.plot(*zip(*points, strict=True), label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    scale = [(r["step"], r["logit_scale"]) for r in records if "logit_scale" in r]
    if scale:
        ax_scale.plot(*zip(*scale, strict=True))
    ax_scale.set(xlabel="step", ylabel="exp(t)", title="logit scale")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
