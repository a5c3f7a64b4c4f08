"""FSDP2 for open_clip models, whose temperature and bias are 0-dim parameters.

`fully_shard` refuses 0-dim parameters ("fully_shard doesn't support scalar parameters"), and
accelerate's FSDP2 preparation shards the root module with every parameter it holds, so an
open_clip model (`logit_scale`, `logit_bias`) cannot be prepared as it is. vlp shards the model
itself before `accelerator.prepare` sees it, with accelerate's plugin settings: one unit per
module class the plugin names (`fsdp_transformer_layer_cls_to_wrap`), then the root, with the
0-dim parameters left out (`ignored_params`). Those stay whole on every rank, outside DDP and
FSDP alike, so `average_replicated_grads` averages their gradients over the ranks before each
update, as DDP would. Accelerate takes an already sharded model as it is.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP2 cannot shard: 0-dim ones (open_clip's logit scale and bias)."""
    return [p for p in model.parameters() if p.ndim == 0]


def shard_model(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Apply `fully_shard` as accelerate's FSDP2 plugin asks, leaving out 0-dim parameters;
    build the optimizer afterwards, from the sharded parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    # Resolves the class names once, on the unsharded model (sharding renames the classes);
    # accelerate's own call in `prepare` then has nothing left to do.
    plugin.set_auto_wrap_policy(model)
    offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, OffloadPolicy) else None
    options = {"reshard_after_forward": plugin.reshard_after_forward,
               "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
               "offload_policy": offload or OffloadPolicy()}
    names = set(plugin.transformer_cls_names_to_wrap or ())
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, **options)
    fully_shard(model, ignored_params=set(replicated_parameters(model)), **options)
    return model


def average_replicated_grads(model: nn.Module, accelerator: Accelerator) -> None:
    """Average the gradients of the parameters left out of FSDP2 over the ranks (in place)."""
    grads = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.stack(grads)
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    for grad, value in zip(grads, flat, strict=True):
        grad.copy_(value)
