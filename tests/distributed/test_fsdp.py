"""FSDP2 on CPU: 2 gloo ranks train vlp-tiny sharded with `fully_shard`, save a checkpoint,
resume from it, and match DDP's losses and checkpoint files.

Accelerate runs FSDP only on accelerator devices: on CPU its `MULTI_CPU` mode ignores an FSDP
plugin and wraps the model in DDP. So the model is sharded here with torch's `fully_shard` (one
unit per open_clip `ResidualAttentionBlock`, as recipes/accelerate/fsdp-1node-8gpu.yaml asks)
and everything else is vlp's own: the step (`vlp.train.step`), the accelerator's gradient
clipping and optimizer, and the checkpoint save/restore of `vlp.train.checkpointing`.

`fully_shard` refuses 0-dim parameters ("fully_shard doesn't support scalar parameters. Change
logit_scale to a 1D tensor with numel equal to 1."), and open_clip's `logit_scale` and
`logit_bias` are 0-dim. Here they stay outside FSDP (`ignored_params`: replicated, plain tensors)
and their gradients are averaged over the ranks by hand, as DDP would (`average_scalar_grads`).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from open_clip.transformer import ResidualAttentionBlock
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from vlp.config import CheckpointConfig, ObjectiveSpec
from vlp.distributed import build_backend
from vlp.models import DualEncoder, build_model
from vlp.objectives import build_objectives
from vlp.train.checkpointing import restore_run_checkpoint, save_run_checkpoint
from vlp.train.step import accumulated_backward, apply_update

WORLD, ROWS, SAVE_AT, STEPS = 2, 4, 3, 5
LR = 1e-3
LOSS_RTOL = 1e-4
"""FSDP's losses against DDP's: the same math with other reduction orders (fp32)."""
WEIGHT_ATOL = 2 * SAVE_AT * LR
"""FSDP's weights against DDP's: an AdamW step moves an element by about lr whatever the size of
its gradient, so an element whose gradient is ~0 may move either way under another reduction
order; the mean difference over all elements must still be tiny (`MEAN_WEIGHT_ATOL`)."""
MEAN_WEIGHT_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_batch(step: int, rank: int, tokenizer) -> dict:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    image = torch.randn(ROWS, 3, 64, 64, generator=generator)
    words = torch.randint(0, 50, (ROWS,), generator=generator).tolist()
    return {"image": image, "text": tokenizer([f"shape number {w}" for w in words]),
            "key": [f"{step}-{rank}-{i}" for i in range(ROWS)]}


def build(accelerator: Accelerator, *, sharded: bool):
    torch.manual_seed(0)
    bundle = build_model("vlp-tiny")
    model = DualEncoder(bundle.model)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for module in model.modules():
            if isinstance(module, ResidualAttentionBlock):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params=set(scalar_parameters(model)))
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=LR))
    else:
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(),
                                                                        lr=LR))
    return bundle, model, optimizer


def scalar_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 0]


def average_scalar_grads(model: torch.nn.Module) -> None:
    """What DDP does for the parameters FSDP does not manage (a no-op under DDP: none)."""
    for param in scalar_parameters(model):
        if param.grad is not None and not isinstance(model, DistributedDataParallel):
            torch.distributed.all_reduce(param.grad)
            param.grad /= WORLD


def train(accelerator, bundle, model, optimizer, steps) -> list[float]:
    objective = build_objectives([ObjectiveSpec("clip")], backend=build_backend("gather"))
    losses = []
    for step in steps:
        batches = iter([micro_batch(step, accelerator.process_index, bundle.tokenizer)])
        terms = accumulated_backward(accelerator, model, objective, batches, num_micro_batches=1)
        average_scalar_grads(model)
        _, skipped = apply_update(accelerator, model, optimizer, loss=terms["loss"],
                                  grad_clip=1.0)
        assert not skipped
        losses.append(terms["loss"].item())
    return losses


def save(accelerator, bundle, model, optimizer, run_dir: Path) -> None:
    save_run_checkpoint(accelerator, run_dir, CheckpointConfig(), step=SAVE_AT, model=model,
                        optimizer=optimizer, trainer_state={"samples_seen": 0},
                        model_info=bundle.spec.model_info(), config_yaml="{}\n",
                        files=bundle.spec.checkpoint_files())


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    out_dir = Path(out)
    results = {}
    for name, sharded in (("ddp", False), ("fsdp", True)):
        bundle, model, optimizer = build(accelerator, sharded=sharded)
        losses = train(accelerator, bundle, model, optimizer, range(SAVE_AT))
        save(accelerator, bundle, model, optimizer, out_dir / name)
        results[name] = losses + train(accelerator, bundle, model, optimizer,
                                       range(SAVE_AT, STEPS))
    bundle, model, optimizer = build(accelerator, sharded=True)
    saved = restore_run_checkpoint(accelerator, out_dir / "fsdp", CheckpointConfig(),
                                   model=model, optimizer=optimizer)
    assert saved is not None and saved["step"] == SAVE_AT
    results["fsdp_resumed"] = train(accelerator, bundle, model, optimizer, range(SAVE_AT, STEPS))
    (out_dir / f"losses.rank{rank}.json").write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=WORLD)
    return out


def losses(runs: Path, rank: int) -> dict[str, list[float]]:
    return json.loads((runs / f"losses.rank{rank}.json").read_text())


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_trains_with_the_losses_of_ddp(runs, rank):
    got = losses(runs, rank)
    assert got["fsdp"] == pytest.approx(got["ddp"], rel=LOSS_RTOL)
    assert got["fsdp"][-1] < got["fsdp"][0]


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_resumes_from_its_checkpoint_with_the_same_losses(runs, rank):
    got = losses(runs, rank)
    assert got["fsdp_resumed"] == pytest.approx(got["fsdp"][SAVE_AT:], rel=1e-6)


def test_fsdp2_checkpoint_holds_the_full_weights_ddp_saves(runs):
    ddp = load_file(runs / "ddp" / f"step-{SAVE_AT:09d}" / "model.safetensors")
    fsdp = load_file(runs / "fsdp" / f"step-{SAVE_AT:09d}" / "model.safetensors")
    assert sorted(fsdp) == sorted(ddp)
    differences = []
    for name, value in ddp.items():
        assert fsdp[name].shape == value.shape
        torch.testing.assert_close(fsdp[name], value, rtol=0, atol=WEIGHT_ATOL)
        differences.append((fsdp[name] - value).abs().flatten())
    assert torch.cat(differences).mean() < MEAN_WEIGHT_ATOL
