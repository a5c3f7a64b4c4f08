"""benchmarks/device_check.py runs end to end with tiny sizes on whatever device is here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_device_check_tiny_prints_every_row_and_passes(tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--tiny", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {}
    for line in out.read_text().splitlines()[2:]:
        check, setting, result, status = (cell.strip() for cell in line.strip("|").split(" | "))
        rows[(check, setting)] = (result, status)
    checks = [check for check, _ in rows]
    for precision in ("fp32", "bf16", "fp16"):
        assert f"tiny recipe {precision}" in checks
    for kind in ("clip", "siglip"):
        loss_rows = [k for k in rows if k[0] == f"tiled {kind} loss vs open_clip"]
        assert [setting.split(",")[0] for _, setting in loss_rows] == ["B=256", "B=1024"]
        assert all("loss difference" in rows[k][0] for k in loss_rows)
    assert "vlp train vs open_clip_train.main" in checks
    nccl = [status for (check, _), (_, status) in rows.items() if check == "NCCL init, 1 process"]
    assert nccl == (["ok"] if torch.cuda.is_available() else ["skipped: no CUDA"])
    assert all(status == "ok" or status.startswith("skipped") for _, status in rows.values())
