"""FSDP2 on CPU: 2 gloo ranks train vlp-tiny sharded as `fsdp-1node-8gpu.yaml` asks, save a
checkpoint, resume from it, and match DDP's losses and checkpoint files.

Accelerate runs FSDP only on accelerator devices: on CPU its `MULTI_CPU` mode ignores an FSDP
plugin and wraps the model in DDP. The test therefore flips accelerate's state to FSDP2 after
the accelerator is made (`as_fsdp2`), with the launch file's plugin settings, so that
`accelerator.prepare` runs accelerate's own FSDP2 preparation on gloo. Everything else is what
`vlp train` runs: `vlp.train.fsdp.shard_model` (open_clip's 0-dim temperature cannot be
sharded), the step of `vlp.train.step`, and the checkpoint save/restore of
`vlp.train.checkpointing`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from vlp.config import CheckpointConfig, ObjectiveSpec
from vlp.data.cache import prepare_shapesworld
from vlp.distributed import build_backend
from vlp.models import DualEncoder, build_model
from vlp.objectives import build_objectives
from vlp.train.build import DataSources, end_of_run_suite
from vlp.train.checkpointing import restore_run_checkpoint, save_run_checkpoint
from vlp.train.fsdp import shard_model
from vlp.train.step import accumulated_backward, apply_update
from vlp.train.trainer import evaluate_on_ranks

WORLD, ROWS, SAVE_AT, STEPS = 2, 4, 3, 5
LR = 1e-3
LOSS_RTOL = 1e-4
"""FSDP's losses against DDP's: the same math with other reduction orders (fp32)."""
WEIGHT_ATOL = 2 * SAVE_AT * LR
"""FSDP's weights against DDP's: an AdamW step moves an element by about lr whatever the size of
its gradient, so an element whose gradient is ~0 may move either way under another reduction
order; the mean difference over all elements must still be tiny (`MEAN_WEIGHT_ATOL`)."""
MEAN_WEIGHT_ATOL = 1e-5
RESUME_RTOL = 1e-5
"""A resumed FSDP2 run's losses against the uninterrupted run's: not bit-exact here (5e-6
relative seen; the cause is not pinned down)."""


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


def as_fsdp2(accelerator: Accelerator) -> None:
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["ResidualAttentionBlock"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT")
    # Both shared states: accelerate re-reads the process state in places (a failed prepare,
    # checkpoint saving), which would otherwise switch back to DDP mid-test.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2


def build(accelerator: Accelerator, *, shard: bool = True):
    """What `Trainer.__init__` does with the model and optimizer."""
    # `vlp train` prepares one model per accelerator; this test prepares several in turn, and
    # accelerate's FSDP clipping looks the model up among all it has prepared.
    accelerator._models.clear()
    accelerator._optimizers.clear()
    torch.manual_seed(0)
    bundle = build_model("vlp-tiny")
    model = DualEncoder(bundle.model)
    if accelerator.is_fsdp2 and shard:
        shard_model(model, accelerator)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=LR)
    return (bundle, *accelerator.prepare(model, optimizer))


def unsharded_error(accelerator: Accelerator) -> str:
    """What accelerate's FSDP2 preparation says about an open_clip model as it is."""
    try:
        build(accelerator, shard=False)
    except ValueError as err:
        return str(err)
    return ""


def train(accelerator, bundle, model, optimizer, steps) -> list[float]:
    objective = build_objectives([ObjectiveSpec("clip")], backend=build_backend("gather"))
    losses = []
    for step in steps:
        batches = iter([micro_batch(step, accelerator.process_index, bundle.tokenizer)])
        terms = accumulated_backward(accelerator, model, objective, batches, num_micro_batches=1)
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


def rank_main(rank: int, port: int, out: str, zeroshot: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    out_dir = Path(out)
    results = {}
    for name in ("ddp", "fsdp"):
        if name == "fsdp":
            as_fsdp2(accelerator)
            results["unsharded_error"] = unsharded_error(accelerator)
            as_fsdp2(accelerator)
        bundle, model, optimizer = build(accelerator)
        assert isinstance(model, FSDPModule if name == "fsdp" else DistributedDataParallel)
        losses = train(accelerator, bundle, model, optimizer, range(SAVE_AT))
        save(accelerator, bundle, model, optimizer, out_dir / name)
        results[name] = losses + train(accelerator, bundle, model, optimizer,
                                       range(SAVE_AT, STEPS))
        assert accelerator.is_fsdp2 == (name == "fsdp")
        results[f"{name}_logit_scale"] = bundle.model.logit_scale.item()
        if name == "fsdp":  # a sharded forward needs every rank
            suite = end_of_run_suite(DataSources("", {"zeroshot": Path(zeroshot)}), batch_size=16)
            result = evaluate_on_ranks(accelerator, model, bundle, suite, out_dir / "eval",
                                       step=STEPS, batch_size=16, model_name="vlp-tiny")
            results["eval"] = None if result is None else result.flat_metrics("eval")
    bundle, model, optimizer = build(accelerator)
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
    shapesworld = prepare_shapesworld(
        out / "cache", {"num_train": 40, "num_eval": 24, "seed": 0, "image_size": 64,
                        "samples_per_shard": 40}, progress=False)
    mp.spawn(rank_main, args=(free_port(), str(out), str(shapesworld / "zeroshot")),
             nprocs=WORLD)
    return out


def losses(runs: Path, rank: int) -> dict[str, list[float]]:
    return json.loads((runs / f"losses.rank{rank}.json").read_text())


def test_fsdp2_cannot_prepare_open_clip_scalar_parameters_unaided(runs):
    assert "fully_shard doesn't support scalar parameters" in losses(runs, 0)["unsharded_error"]


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_trains_with_the_losses_of_ddp(runs, rank):
    got = losses(runs, rank)
    assert got["fsdp"] == pytest.approx(got["ddp"], rel=LOSS_RTOL)
    assert got["fsdp"][-1] < got["fsdp"][0]


def test_the_temperature_fsdp2_leaves_whole_stays_equal_on_every_rank_and_to_ddps(runs):
    ranks = [losses(runs, rank) for rank in range(WORLD)]
    assert len({r["fsdp_logit_scale"] for r in ranks}) == 1
    assert ranks[0]["fsdp_logit_scale"] == pytest.approx(ranks[0]["ddp_logit_scale"], rel=1e-6)


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_resumes_from_its_checkpoint_with_the_same_losses(runs, rank):
    got = losses(runs, rank)
    assert got["fsdp_resumed"] == pytest.approx(got["fsdp"][SAVE_AT:], rel=RESUME_RTOL)


def test_fsdp2_model_is_evaluated_on_every_rank_and_reported_by_the_first(runs):
    assert losses(runs, 1)["eval"] is None
    metrics = losses(runs, 0)["eval"]
    assert 0.0 <= metrics["eval/zeroshot/acc1"] <= 1.0
    assert json.loads((runs / "eval" / "zeroshot.json").read_text())["task"] == (
        "zeroshot_classification")


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
