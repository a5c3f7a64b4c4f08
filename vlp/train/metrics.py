"""Metric sinks, the loss-curve plot and the training-diagnostics plot.

`JSONLTracker` is an accelerate tracker writing one JSON object per logged step to
`metrics.jsonl`, so `accelerator.log` reaches it beside TensorBoard, W&B, ... A run killed
mid-write, or a full disk, can leave a torn last line: readers skip it, and the next run that
appends to the file cuts it off first, so its records start on a line of their own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

log = logging.getLogger(__name__)


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
            repair_torn_tail(self.path)
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


def repair_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write that never completed) off `path`; a
    complete record that only lacks its newline gets one instead."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = _last_newline_end(f, size)
        f.seek(keep)
        if _is_record(f.read()):
            f.write(b"\n")
            return
        f.truncate(keep)
    log.warning("%s: removed a torn last line (%d bytes) left by an interrupted write",
                path, size - keep)


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _last_newline_end(f, size: int, block: int = 1 << 16) -> int:
    """The offset just past the last newline before `size` (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        index = f.read(end - start).rfind(b"\n")
        if index >= 0:
            return start + index + 1
        end = start
    return 0


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """One record per step of a metrics.jsonl: records of one step (training metrics, eval
    metrics) are merged, and a resumed run's repeated steps keep the newest values. A torn
    last line is skipped, and so is a bad line elsewhere, with a warning naming it."""
    lines = Path(path).read_text(errors="replace").splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number < len(lines):  # the last line is torn by an interrupted write
                log.warning("%s:%d: skipping a line that is not a metrics record: %.80r",
                            path, number, line)
            continue
        by_step.setdefault(step, {}).update(record)
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


DIAGNOSTIC_SERIES = {"gap": ("diag/gap",), "cosine": ("diag/pos_cosine", "diag/neg_cosine")}
"""The diagnostics plot's panels and the metrics.jsonl keys each draws."""


def plot_diagnostics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot the modality gap and the mean positive/negative cosine against step (the
    `diag/*` records of `vlp.train.diagnostics`); None, and no file, when there are none."""
    records = [r for r in read_metrics(metrics_path) if "diag/gap" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIAGNOSTIC_SERIES), figsize=(10, 4))
    for ax, (panel, keys) in zip(axes, DIAGNOSTIC_SERIES.items(), strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points, strict=True), marker=".", label=key.removeprefix("diag/"))
        ax.set(xlabel="step", ylabel=panel, title=f"training {panel} (last micro-batch)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
