"""Spawned gloo process groups and the per-rank jobs the distributed tests check.

Shapes: b local batch, W world size, B = W·b global batch, Din input dim, D feature dim,
K hard negatives per image.

Each world size is spawned once; every job for it runs in that one process group and returns
plain tensors to the test process, which compares them with a single-process reference.
DDP is emulated: features come from per-rank linear "towers" with shared weights, and every
parameter gradient is averaged over ranks (all_reduce / W) as DDP does.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vlp.distributed import Ring, build_backend

WORLD_SIZES = (1, 2, 3, 4)
KINDS = ("softmax", "sigmoid", "negatives", "leave_one_out", "leave_one_out_negatives")
"""leave_one_out: the softmax with each positive left out of its own denominator (DCL /
InfoLOOB); _negatives: with NegCLIP's hard negatives too."""
DTYPES = ("float64", "float32")
INPUT_DIM, FEATURE_DIM, LOCAL_BATCH, NUM_NEGATIVES = 24, 32, 9, 3
TILE_SIZES = {"softmax": 5, "sigmoid": 7, "negatives": 5,  # neither divides b = 9 nor b·K = 27
              "leave_one_out": 5, "leave_one_out_negatives": 4}


def backends_for(world_size: int) -> tuple[str, ...]:
    return ("local", "gather", "ring") if world_size == 1 else ("gather", "ring")


@dataclass(frozen=True)
class Case:
    """One loss on one backend in one dtype."""

    backend: str
    kind: str
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.kind}-{self.dtype}"


def all_cases(world_size: int) -> list[Case]:
    return [
        Case(backend, kind, dtype)
        for backend in backends_for(world_size)
        for kind in KINDS
        for dtype in DTYPES
    ]


def make_inputs(kind: str, world_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """The global batch's tower inputs and the shared parameters, identical on every rank.

    Inputs have very different norms row to row; the logit scale is in [10, 50], the bias in
    [-10, 0]. Values are drawn in float64 and rounded to `dtype`.
    """
    g = torch.Generator().manual_seed(1000 * world_size + KINDS.index(kind))
    num = world_size * LOCAL_BATCH

    def rows(*shape: int) -> Tensor:
        norms = torch.exp(2 * torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64))
        return torch.randn(*shape, generator=g, dtype=torch.float64) * norms

    values = {
        "image_inputs": rows(num, INPUT_DIM),
        "text_inputs": rows(num, INPUT_DIM),
        "neg_inputs": rows(num, NUM_NEGATIVES, INPUT_DIM),
        "image_proj": torch.randn(INPUT_DIM, FEATURE_DIM, generator=g, dtype=torch.float64),
        "text_proj": torch.randn(INPUT_DIM, FEATURE_DIM, generator=g, dtype=torch.float64),
        "log_scale": torch.log(10 + 40 * torch.rand((), generator=g, dtype=torch.float64)),
        "bias": -10 * torch.rand((), generator=g, dtype=torch.float64),
    }
    return {name: value.to(dtype) for name, value in values.items()}


PARAMETERS = ("image_proj", "text_proj", "log_scale", "bias")


def towers(inputs: dict[str, Tensor], rows: slice) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Leaf parameters and the normalised features of `rows` (features retain their grads)."""
    params = {name: inputs[name].clone().requires_grad_() for name in PARAMETERS}
    features = {
        "image": F.normalize(inputs["image_inputs"][rows] @ params["image_proj"], dim=-1),
        "text": F.normalize(inputs["text_inputs"][rows] @ params["text_proj"], dim=-1),
        "neg": F.normalize(inputs["neg_inputs"][rows] @ params["text_proj"], dim=-1),
    }
    for feature in features.values():
        feature.retain_grad()
    return params, features


def backend_loss(backend: Any, kind: str, params: dict, features: dict) -> Tensor:
    scale = params["log_scale"].exp()
    if kind == "sigmoid":
        return backend.sigmoid(features["image"], features["text"], scale, params["bias"])
    negatives = features["neg"] if kind.endswith("negatives") else None
    return backend.softmax(features["image"], features["text"], scale, neg_text_features=negatives,
                           leave_one_out=kind.startswith("leave_one_out"))


def _ddp_mean(grad: Tensor) -> Tensor:
    grad = grad.clone()
    if dist.is_initialized():
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grad


def gradient_job(rank: int, world_size: int, case: Case) -> dict[str, Tensor]:
    """This rank's loss, raw feature gradients and DDP-averaged parameter gradients."""
    inputs = make_inputs(case.kind, world_size, getattr(torch, case.dtype))
    params, features = towers(inputs, slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
    backend = build_backend(case.backend, tile_size=TILE_SIZES[case.kind])
    loss = backend_loss(backend, case.kind, params, features)
    loss.backward()
    result = {"loss": loss.detach()}
    result |= {f"grad_{k}": f.grad for k, f in features.items() if f.grad is not None}
    result |= {f"grad_{k}": _ddp_mean(p.grad) for k, p in params.items() if p.grad is not None}
    return result


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op outputs while active (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), str(func)
        return out


MEMORY_PROBE = {"local_batch": 32, "dim": 8, "num_negatives": 2, "tile_size": 5}
MEMORY_PROBE_WORLD_SIZES = (2, 3)  # one even, one odd ring (the probe costs a torch._dynamo import)


def peak_numel_job(rank: int, world_size: int, backend: str, kind: str) -> dict[str, Any]:
    """Largest tensor created by a loss forward+backward on this rank (inputs made outside)."""
    b, dim, k, tile = (
        MEMORY_PROBE[n] for n in ("local_batch", "dim", "num_negatives", "tile_size")
    )
    g = torch.Generator().manual_seed(rank)
    x, y = (F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_() for _ in "xy")
    neg = F.normalize(torch.randn(b, k, dim, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor(20.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    loss_backend = build_backend(backend, tile_size=tile)
    with MaxNumel() as probe:
        if kind == "sigmoid":
            loss = loss_backend.sigmoid(x, y, scale, bias)
        else:
            loss = loss_backend.softmax(x, y, scale, neg_text_features=neg)
        loss.backward()
    return {"max_numel": probe.max_numel, "op": probe.op}


def uneven_batch_job(rank: int, world_size: int, backend: str) -> str:
    """The error message a backend raises when rank 1 has one more row than rank 0."""
    b = 4 + (rank == 1)
    x = F.normalize(torch.randn(b, 8), dim=-1)
    try:
        build_backend(backend).softmax(x, x, torch.tensor(10.0))
    except ValueError as error:
        return str(error)
    return ""


def shape_check_job(rank: int, world_size: int) -> list[tuple[int, ...]]:
    """The shapes compared across ranks over repeated ring and gather calls (all ranks alike).

    D = 12 keeps these shapes apart from the other jobs' (the comparison is once per shape).
    """
    compared: list[tuple[int, ...]] = []
    original = Ring.all_gather_ints

    def recording(self: Ring, values, *, device):
        compared.append(tuple(values))
        return original(self, values, device=device)

    Ring.all_gather_ints = recording
    try:
        for b in (6, 6, 6, 3, 3, 6):
            x = F.normalize(torch.randn(b, 12), dim=-1)
            for backend in ("ring", "gather"):
                build_backend(backend).softmax(x, x, torch.tensor(10.0))
    finally:
        Ring.all_gather_ints = original
    return compared


def backend_choice_job(rank: int, world_size: int) -> dict[str, str]:
    """Which backend 'auto' picks here, and what building 'local' says."""
    try:
        build_backend("local")
        local = ""
    except ValueError as error:
        local = str(error)
    return {"auto": build_backend("auto").name, "local_error": local}


MULTIPOS_BATCH, MULTIPOS_POSITIVES = 5, 3


def multipos_inputs(world_size: int) -> dict[str, Tensor]:
    """A float64 global batch for the multi-positive loss: images (B, D), positives (B, K, D)
    and a mask with 1..K real positives per image, identical on every rank."""
    generator = torch.Generator().manual_seed(11)
    batch = MULTIPOS_BATCH * world_size
    counts = torch.arange(batch) % MULTIPOS_POSITIVES + 1
    return {
        "image": torch.randn(batch, FEATURE_DIM, generator=generator, dtype=torch.float64),
        "pos": torch.randn(batch, MULTIPOS_POSITIVES, FEATURE_DIM, generator=generator,
                           dtype=torch.float64),
        "mask": torch.arange(MULTIPOS_POSITIVES)[None, :] < counts[:, None],
        "log_scale": torch.tensor(2.5, dtype=torch.float64),
    }


def multipos_loss(backend: Any, leaves: dict[str, Tensor], rows: slice) -> Tensor:
    return backend.multi_positive(F.normalize(leaves["image"][rows], dim=-1),
                                  F.normalize(leaves["pos"][rows], dim=-1),
                                  leaves["mask"][rows], leaves["log_scale"].exp())


MULTIPOS_TILE_SIZE = 4
"""Divides neither b = 5 nor a rank's b·K = 15 captions: the ring's partial tiles are used."""


def multipos_job(rank: int, world_size: int, backend: str) -> dict[str, Tensor]:
    """This rank's multi-positive loss and DDP-averaged gradients of the global leaves."""
    inputs = multipos_inputs(world_size)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    rows = slice(rank * MULTIPOS_BATCH, (rank + 1) * MULTIPOS_BATCH)
    loss = multipos_loss(build_backend(backend, tile_size=MULTIPOS_TILE_SIZE), leaves, rows)
    loss.backward()
    return {"loss": loss.detach()} | {f"grad_{k}": _ddp_mean(v.grad)
                                      for k, v in leaves.items() if v.grad is not None}


def multipos_peak_numel_job(rank: int, world_size: int, backend: str) -> dict[str, Any]:
    """Largest tensor created by a multi-positive loss forward+backward on this rank, with
    `MEMORY_PROBE`'s b, D and tile and K = its num_negatives positives (1..K real)."""
    b, dim, k, tile = (
        MEMORY_PROBE[n] for n in ("local_batch", "dim", "num_negatives", "tile_size")
    )
    g = torch.Generator().manual_seed(rank)
    x = F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
    pos = F.normalize(torch.randn(b, k, dim, generator=g), dim=-1).requires_grad_()
    mask = torch.arange(k)[None, :] < (torch.arange(b) % k + 1)[:, None]
    scale = torch.tensor(20.0, requires_grad=True)
    loss_backend = build_backend(backend, tile_size=tile)
    with MaxNumel() as probe:
        loss_backend.multi_positive(x, pos, mask, scale).backward()
    return {"max_numel": probe.max_numel, "op": probe.op}


def multipos_jobs(world_size: int) -> dict[str, tuple[Callable, dict]]:
    jobs: dict[str, tuple[Callable, dict]] = {}
    for backend in ("gather", "ring"):
        jobs[f"multipos/{backend}"] = (multipos_job, {"backend": backend})
        jobs[f"numel/{backend}-multipos"] = (multipos_peak_numel_job, {"backend": backend})
    return jobs


def world_jobs(world_size: int) -> dict[str, tuple[Callable, dict]]:
    jobs: dict[str, tuple[Callable, dict]] = {
        f"grad/{case.key}": (gradient_job, {"case": case}) for case in all_cases(world_size)
    }
    jobs["choice"] = (backend_choice_job, {})
    for backend in ("ring", "gather"):
        if world_size in MEMORY_PROBE_WORLD_SIZES:
            for kind in ("negatives", "sigmoid"):
                jobs[f"numel/{backend}-{kind}"] = (
                    peak_numel_job,
                    {"backend": backend, "kind": kind},
                )
        if world_size > 1:
            jobs[f"uneven/{backend}"] = (uneven_batch_job, {"backend": backend})
    if world_size > 1:
        jobs["shape_checks"] = (shape_check_job, {})
    return jobs


def _rank_main(rank: int, world_size: int, store_dir: str,
               jobs_of: Callable[[int], dict[str, tuple[Callable, dict]]] = world_jobs) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world_size
    )
    try:
        results = {
            name: job(rank, world_size, **kwargs)
            for name, (job, kwargs) in jobs_of(world_size).items()
        }
    except BaseException:
        dist.destroy_process_group()
        raise
    save_and_exit(results, os.path.join(store_dir, f"rank{rank}.pt"))


def save_and_exit(results: Any, path: str) -> NoReturn:
    """Save a spawned rank's results once every rank has finished, then end the process
    without tearing its gloo group down.

    Teardown is where ranks died: gloo's destructors, racing a peer that is closing its own
    connections, abort with SIGABRT ("terminate called without an active exception", a
    still-running std::thread destroyed). It happened twice in CI after every job had run (the
    short multipos job; W4 gather softmax, 4 ranks on 2 cores), once even after the barrier
    below. The results are complete by then, so the rank exits at once (`os._exit`): the
    operating system closes its sockets, and no destructor runs.
    """
    dist.barrier()  # no rank leaves while a peer may still be in the last collective
    torch.save(results, path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@functools.cache
def world_results(world_size: int) -> list[dict[str, Any]]:
    """Every job's result on every rank of one spawned gloo group of `world_size` processes."""
    return spawned_results(world_size, world_jobs)


def spawned_results(world_size: int, jobs_of: Callable[[int], dict[str, tuple[Callable, dict]]]
                    ) -> list[dict[str, Any]]:
    """The results of `jobs_of(world_size)` (a module-level function) on every rank of one
    spawned gloo group."""
    with tempfile.TemporaryDirectory() as store_dir:
        mp.start_processes(
            _rank_main, args=(world_size, store_dir, jobs_of), nprocs=world_size,
            start_method="spawn"
        )
        return [
            torch.load(os.path.join(store_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
