"""Gradient cache (Gao et al., 2021): many micro-batches, one exact contrastive batch.

Shapes: n = `train.grad_accum` micro-batches of m rows each, b = n·m rows per rank, W ranks,
B = W·b global batch, D embedding dim, K hard negatives per image.

A plain accumulated step computes the contrastive loss per micro-batch (B = W·m columns). With
`train.grad_cache: true` one optimizer step is one contrastive batch of all B rows, while the
activations of only one micro-batch are alive at a time:

1. embed every micro-batch without grad, recording the RNG state before each forward;
2. concatenate this rank's b rows of features, run the objective once through the contrastive
   backend (ring/gather see all B rows), and take the loss's gradient w.r.t. the features and
   the logit scale/bias: the cached gradients (b×D, tiny next to the activations);
3. re-forward each micro-batch with grad under its replayed RNG state and back-propagate
   Σ features · cached gradient: by the chain rule its parameter gradients are those rows'
   contribution to the loss's. Parameter gradients accumulate; DDP all-reduces on the last
   micro-batch only (`no_sync` before), which also carries the scale and bias terms.

Gradient semantics: parameter gradients equal those of one plain step on this rank's b rows in
one process, and after DDP's mean over ranks those of one step on the B-row global batch (the
backends give each rank's features that semantics, docs/design.md §3–4). Per-rank objectives
(align_uniform) therefore see b rows, as a plain step with a b-row batch would.

Layers with batch statistics (BatchNorm) normalise each micro-batch of m rows on its own, as
they normalise each rank's rows under DDP; the step is then exact for that model function (the
same as n·W ranks of m rows each), and equals the one-batch step only for towers without batch
statistics (ViTs, text transformers). Running statistics are updated once per micro-batch.

Only a loss that is a function of the cached outputs can be cached; per-sample terms on other
outputs (CoCa's caption logits) would need their own re-forward and are rejected by the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

ROW_OUTPUTS = ("image_features", "text_features", "neg_text_features", "pos_text_features")
"""Model outputs with one entry per sample: concatenated over micro-batches."""
SHARED_OUTPUTS = ("logit_scale", "logit_bias")
"""Model outputs shared by all samples (parameters): taken once."""
CACHEABLE_OUTPUTS = frozenset(ROW_OUTPUTS + SHARED_OUTPUTS)
"""Every model output an objective may read when `train.grad_cache` is on."""


@dataclass(frozen=True)
class RngState:
    """The RNG states a forward draws from (CPU, and CUDA/XPU for such a device), to replay it."""

    cpu: Tensor
    device: torch.device
    device_state: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        module = _seeded_device_module(device)
        return cls(torch.get_rng_state(), device,
                   None if module is None else module.get_rng_state(device))

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the RNG continues afterwards as if it had not run."""
        module = _seeded_device_module(self.device)
        devices = [] if module is None else [self.device]
        device_type = "cuda" if module is None else self.device.type
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if module is not None:
                module.set_rng_state(self.device_state, self.device)
            yield


def _seeded_device_module(device: torch.device) -> Any:
    if device.type in ("cuda", "xpu"):
        return torch.get_device_module(device.type)
    return None


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Undo what the block does to the model's buffers (BatchNorm running statistics): the
    re-forward updates them, once per micro-batch as a plain step does."""
    saved = [buffer.detach().clone() for buffer in model.buffers()]
    yield
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved, strict=True):
            buffer.copy_(value)


def forward(model: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model's output dict for one batch (hard-negative and positive captions included
    when present). Images go in channels-last: convolutions run faster on it (oneDNN on CPU,
    tensor cores under mixed precision), a convolutional tower keeps it to its last layer, and
    the features are the same up to float rounding."""
    extra = {name: batch[name].to(device) for name in ("neg_text", "pos_text") if name in batch}
    image = batch["image"].to(device)
    if image.ndim == 4:  # N C H W
        image = image.contiguous(memory_format=torch.channels_last)
    return model(image, batch["text"].to(device), **extra)


def cached_backward(
    model: nn.Module,
    objective: nn.Module,
    micro_batches: Sequence[dict[str, Any]],
    *,
    device: torch.device,
    backward: Callable[[Tensor], Any] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    observe: Callable[[dict[str, Tensor]], Any] | None = None,
) -> dict[str, Tensor]:
    """Accumulate into `.grad` the gradients of `objective` on all `micro_batches` at once.

    `backward` is called once per micro-batch (`accelerator.backward` scales for fp16), the
    first n−1 times inside `no_sync()` (`accelerator.no_sync(model)`: DDP reduces once).
    Returns the objective's terms (detached); no optimizer step. `observe`, if given, is
    called with the last micro-batch's output of the no-grad forward (training diagnostics).
    """
    rng_states, outputs = [], []
    with torch.no_grad(), _buffers_kept(model):
        for batch in micro_batches:
            rng_states.append(RngState.capture(device))
            outputs.append(_checked(forward(model, batch, device)))
    if observe is not None:
        observe(outputs[-1])
    cached = _concatenated(outputs)
    terms = objective(cached, _concatenated_batch(micro_batches))
    grads = dict(zip(cached, torch.autograd.grad(terms["loss"], list(cached.values()),
                                                 allow_unused=True), strict=True))

    start = 0
    for i, (batch, rng_state) in enumerate(zip(micro_batches, rng_states, strict=True)):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else no_sync(), rng_state.replay():
            output = forward(model, batch, device)
            stop = start + output["image_features"].shape[0]
            backward(_surrogate(output, grads, slice(start, stop), with_shared=last))
        start = stop
    return {name: value.detach() for name, value in terms.items()}


def _surrogate(output: dict[str, Tensor], grads: dict[str, Tensor | None], rows: slice, *,
               with_shared: bool) -> Tensor:
    """Σ output ⊙ cached gradient over this micro-batch's rows, plus the shared scale and bias
    when `with_shared` (once per step): its parameter gradients are these rows' share of the
    loss's. An output the loss does not use enters as 0, so that DDP sees every parameter used.
    """
    total = torch.zeros((), device=output["image_features"].device)
    for name in ROW_OUTPUTS + (SHARED_OUTPUTS if with_shared else ()):
        if name not in grads:
            continue
        value, grad = output[name], grads[name]
        if grad is None:
            total = total + (value * 0).sum()
        else:
            grad = grad[rows] if name in ROW_OUTPUTS else grad
            total = total + (value.to(grad.dtype) * grad).sum()
    return total


def _checked(output: dict[str, Any]) -> dict[str, Tensor]:
    extra = sorted(k for k, v in output.items() if v is not None and k not in CACHEABLE_OUTPUTS)
    if extra:
        raise ValueError(
            f"train.grad_cache caches only {sorted(CACHEABLE_OUTPUTS)}, but the model also "
            f"returns {extra}; objectives reading them cannot be cached"
        )
    return {k: v for k, v in output.items() if v is not None}


def _concatenated(outputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Leaves that require grad: rows concatenated in micro-batch order, shared values once.

    Half-precision features are promoted to float32 so that the loss and the cached gradients
    (of order 1/B per entry) do not underflow.
    """
    cached = {}
    for name in ROW_OUTPUTS:
        if name in outputs[0]:
            cached[name] = torch.cat([o[name] for o in outputs])
    for name in SHARED_OUTPUTS:
        if name in outputs[0]:
            cached[name] = outputs[-1][name]
    return {
        name: (value.float() if value.dtype in (torch.float16, torch.bfloat16) else value)
        .detach().requires_grad_()
        for name, value in cached.items()
    }


def _concatenated_batch(micro_batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The micro-batches' tensor and list fields joined, as the objectives' `batch` argument;
    images are left out (objectives read features, and a copy of every pixel would be large)."""
    joined: dict[str, Any] = {}
    for name, value in micro_batches[0].items():
        if name in ("image", "neg_image"):
            continue
        if isinstance(value, Tensor):
            joined[name] = torch.cat([b[name] for b in micro_batches])
        elif isinstance(value, list):
            joined[name] = [item for b in micro_batches for item in b[name]]
    return joined

