"""The cluster launch files in recipes/: accelerate reads them as we mean them."""

import os
import signal
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from vlp.models import build_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "accelerate"
SBATCH = ROOT / "recipes" / "slurm" / "train.sbatch"

EXPECTED = {  # file: (machines, processes in all, distributed type)
    "ddp-1node-8gpu.yaml": (1, 8, "MULTI_GPU"),
    "ddp-4node-8gpu.yaml": (4, 32, "MULTI_GPU"),
    "fsdp-1node-8gpu.yaml": (1, 8, "FSDP"),
}


def launch_args(config: Path, *extra: str):
    """What `accelerate launch --config_file CONFIG ... -m vlp train r.yaml` would run with."""
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    args = parser.parse_args(["--config_file", str(config), *extra, "-m", "vlp", "train", "r.yaml"])
    args, _, _ = _validate_launch_command(args)
    return args, known


def test_every_launch_file_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_the_launch_file_strictly(name):
    machines, processes, kind = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))  # unknown keys raise
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"

    args, known = launch_args(CONFIGS / name, "--machine_rank", str(machines - 1),
                              "--main_process_ip", "10.0.0.1")
    assert (args.num_machines, args.num_processes, args.machine_rank) == (
        machines, processes, machines - 1)
    assert not set(config.fsdp_config) - known, "fsdp_config keys accelerate launch ignores"
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env.get("ACCELERATE_USE_FSDP") == ("true" if kind == "FSDP" else None)


def test_fsdp_wraps_each_open_clip_transformer_block():
    args, _ = launch_args(CONFIGS / "fsdp-1node-8gpu.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    model = build_model("vlp-tiny-coca").model  # both towers and the caption decoder
    plugin.set_auto_wrap_policy(model)  # raises if the class is not in the model
    (block_cls,) = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    towers = {name.split(".")[0] for name, m in model.named_modules() if isinstance(m, block_cls)}
    assert block_cls.__name__ == "ResidualAttentionBlock" and len(blocks) >= 3
    assert towers >= {"visual", "text", "text_decoder"}
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"


def test_slurm_script_is_valid_bash_and_requests_a_warning_signal():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    text = SBATCH.read_text()
    for needed in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "--machine_rank $SLURM_NODEID",
                   "scontrol show hostnames", "checkpoint.resume=auto"):
        assert needed in text, needed


FAKES = {  # stand-ins for the cluster's commands, logging how the script calls them
    "scontrol": """if [ "$1" = show ]; then printf 'gpu-node-07\\ngpu-node-08\\n'; \
else echo "scontrol $*" >> "$LOG"; fi""",
    "srun": """while [ "${1#--}" != "$1" ]; do shift; done; exec "$@" """,
    "pkill": """echo "pkill $*" >> "$LOG"; kill -USR1 "$(cat "$WORKER_PID")" """,
    "accelerate": """echo "accelerate $*" >> "$LOG"; exec bash -c '
        trap "echo worker saved on USR1 >> \\"$LOG\\"; exit 138" USR1
        echo $$ > "$WORKER_PID"; while true; do sleep 0.05; done'""",
}


def test_slurm_script_forwards_the_warning_signal_to_vlp_then_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log, worker_pid = tmp_path / "log", tmp_path / "worker.pid"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log),
           "WORKER_PID": str(worker_pid), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "USER": "me"}
    job = subprocess.Popen(["bash", str(SBATCH), "recipes/clip-vit-b32.yaml", "train.steps=9"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    deadline = time.time() + 20
    while not worker_pid.exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    out, _ = job.communicate(timeout=20)

    lines = log.read_text().splitlines()
    assert lines[0] == (
        "accelerate launch --config_file recipes/accelerate/ddp-4node-8gpu.yaml "
        "--num_machines 2 --num_processes 16 --machine_rank 1 --main_process_ip gpu-node-07 "
        "--main_process_port 29500 -m vlp train recipes/clip-vit-b32.yaml "
        "checkpoint.resume=auto train.steps=9"), out
    assert lines[1:] == ["pkill -USR1 -u me -f python -u -m vlp train",
                         "worker saved on USR1", "scontrol requeue 4242"], out
