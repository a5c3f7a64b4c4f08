"""Mixed precision is exact: fp16 with a grad scaler skips and backs off cleanly on an overflow,
a non-finite micro-batch is never applied, and bf16 autocast trains as fp32 does.

Every test runs the update of a training step (`vlp.train.step`: plain accumulation or the
gradient cache, then `apply_update`) on a CPU `Accelerator`. Accelerate gives no grad scaler on
CPU (its fp16 needs a GPU), so the fp16 tests hand it a CPU `torch.amp.GradScaler`, which
accelerate's optimizer and `clip_grad_norm_` then drive exactly as on a GPU; the overflow is a
micro-batch holding an inf.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from vlp.config import ObjectiveSpec
from vlp.distributed import build_backend
from vlp.objectives import build_objectives
from vlp.train.step import accumulated_backward, apply_update, cached_step_backward

ROWS, IMAGE_DIM, TEXT_DIM, EMBED_DIM = 8, 12, 6, 8
INIT_SCALE = 2.0**10
FP16_TOLERANCE = 2e-2
"""Relative difference allowed between fp16 (autocast + scaler) or bf16 losses and fp32's."""
BF16_TOLERANCE = 5e-2


class TinyDualEncoder(nn.Module):
    """Linear towers: the output contract of `vlp.models.DualEncoder`."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(IMAGE_DIM, EMBED_DIM)
        self.text = nn.Linear(TEXT_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image, text, neg_text=None):
        return {"image_features": F.normalize(self.image(image).float(), dim=-1),
                "text_features": F.normalize(self.text(text).float(), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def batch(seed: int, *, poisoned: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(ROWS, IMAGE_DIM, generator=generator)
    if poisoned:
        image[0, 0] = float("inf")
    return {"image": image, "text": torch.randn(ROWS, TEXT_DIM, generator=generator),
            "key": [f"{seed}-{i}" for i in range(ROWS)]}


@pytest.fixture
def setup():
    """`setup(mixed_precision=..., grad_accum=..., grad_cache=..., scaler=...)` → a prepared
    (accelerator, model, optimizer); accelerate's global state is reset around each test."""

    def make(*, mixed_precision="no", grad_accum=2, grad_cache=False, scaler=False):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision,
                                  gradient_accumulation_steps=1 if grad_cache else grad_accum)
        if scaler:
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
            accelerator.native_amp = True
        torch.manual_seed(0)
        model = TinyDualEncoder()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return (accelerator, *accelerator.prepare(model, optimizer))

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


OBJECTIVE = build_objectives([ObjectiveSpec("clip")], backend=build_backend("local"))


def train_step(accelerator, model, optimizer, micro_batches, *, grad_cache, grad_clip):
    """What `Trainer.step` does with the micro-batches: returns (loss, grad_norm, skipped)."""
    if grad_cache:
        terms = cached_step_backward(accelerator, model, OBJECTIVE, micro_batches)
    else:
        terms = accumulated_backward(accelerator, model, OBJECTIVE, iter(micro_batches),
                                     num_micro_batches=len(micro_batches))
    grad_norm, skipped = apply_update(accelerator, model, optimizer, loss=terms["loss"],
                                      grad_clip=grad_clip)
    return terms["loss"], grad_norm, skipped


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


PATHS = pytest.mark.parametrize("grad_cache, grad_clip", [
    (False, 0.0), (False, 1.0), (True, 0.0), (True, 1.0)],
    ids=["accumulate-noclip", "accumulate-clip", "gradcache-noclip", "gradcache-clip"])


@PATHS
def test_fp16_overflow_is_skipped_the_scale_backs_off_and_the_next_step_trains(
        setup, grad_cache, grad_clip):
    accelerator, model, optimizer = setup(mixed_precision="fp16", grad_cache=grad_cache,
                                          scaler=True)
    before = weights(model)
    _, _, skipped = train_step(accelerator, model, optimizer, [batch(0, poisoned=True), batch(1)],
                               grad_cache=grad_cache, grad_clip=grad_clip)
    assert skipped and optimizer.step_was_skipped
    assert accelerator.scaler.get_scale() == INIT_SCALE / 2
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert not optimizer.optimizer.state  # AdamW never stepped: no moments, no step count

    loss, grad_norm, skipped = train_step(accelerator, model, optimizer, [batch(2), batch(3)],
                                          grad_cache=grad_cache, grad_clip=grad_clip)
    assert not skipped and torch.isfinite(loss) and torch.isfinite(grad_norm)
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert accelerator.scaler.get_scale() == INIT_SCALE / 2  # no growth before 2000 good steps


@PATHS
def test_a_nonfinite_micro_batch_is_never_applied_without_a_grad_scaler(
        setup, grad_cache, grad_clip):
    accelerator, model, optimizer = setup(grad_cache=grad_cache)
    before = weights(model)
    # The bad micro-batch comes first: the last one alone is finite.
    loss, _, skipped = train_step(accelerator, model, optimizer,
                                  [batch(0, poisoned=True), batch(1)],
                                  grad_cache=grad_cache, grad_clip=grad_clip)
    assert skipped and not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert not optimizer.optimizer.state
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step

    _, _, skipped = train_step(accelerator, model, optimizer, [batch(2), batch(3)],
                               grad_cache=grad_cache, grad_clip=grad_clip)
    assert not skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def losses_over_steps(setup, num_steps: int = 6, **precision) -> tuple[list[float], list]:
    accelerator, model, optimizer = setup(**precision)
    losses = []
    for step in range(num_steps):
        loss, _, skipped = train_step(accelerator, model, optimizer,
                                      [batch(2 * step), batch(2 * step + 1)],
                                      grad_cache=False, grad_clip=1.0)
        assert not skipped
        losses.append(loss.item())
    return losses, weights(model)


def test_bf16_autocast_trains_like_fp32_within_tolerance(setup):
    fp32, fp32_weights = losses_over_steps(setup)
    bf16, bf16_weights = losses_over_steps(setup, mixed_precision="bf16")
    assert AcceleratorState().mixed_precision == "bf16"
    assert bf16 != fp32  # autocast did run in bf16
    assert bf16 == pytest.approx(fp32, rel=BF16_TOLERANCE)
    for a, b in zip(fp32_weights, bf16_weights, strict=True):
        torch.testing.assert_close(b, a, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE)


def test_fp16_with_a_grad_scaler_trains_like_fp32_when_nothing_overflows(setup):
    fp32, fp32_weights = losses_over_steps(setup)
    fp16, fp16_weights = losses_over_steps(setup, mixed_precision="fp16", scaler=True)
    assert fp16 != fp32  # autocast did run in fp16
    assert fp16 == pytest.approx(fp32, rel=FP16_TOLERANCE)
    for a, b in zip(fp32_weights, fp16_weights, strict=True):
        torch.testing.assert_close(b, a, rtol=FP16_TOLERANCE, atol=FP16_TOLERANCE)
