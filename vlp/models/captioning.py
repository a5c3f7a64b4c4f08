"""Greedy caption generation with a CoCa model's text decoder.

Shapes: b images, T generated length (≤ `max_length`), V vocabulary size.

Own loop rather than open_clip's `CoCa.generate`: that method asserts on `transformers`'
`BeamSearchScorer`, which transformers 5 removed, so it cannot run at all there. Greedy decoding
here gives the same tokens as `CoCa.generate(generation_type="top_k", top_k=1, min_seq_len=0)`
(checked in tests/unit/test_objectives.py, with open_clip's top-k path switched back on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def generate_captions(
    model: nn.Module, tokenizer: Any, images: torch.Tensor, *, max_length: int | None = None
) -> list[str]:
    """One greedy caption per image (b, 3, H, W) from an open_clip CoCa model.

    `max_length` counts the start and end tokens, like the tokenizer's context length, and
    defaults to the decoder's context length (its maximum). `tokenizer` is the model's
    (`ModelBundle.tokenizer`): its start/end token ids and `decode` are used.
    """
    if not hasattr(model, "text_decoder"):
        raise TypeError(
            f"generate_captions needs an open_clip CoCa model (with a text decoder), got "
            f"{type(model).__name__}; pass the open_clip model, not a wrapper around it"
        )
    context_length = model.context_length
    max_length = context_length if max_length is None else max_length
    if not 2 < max_length <= context_length:
        raise ValueError(f"max_length must be in 3..{context_length}, got {max_length}")
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id

    was_training = model.training
    model.eval()
    try:
        encoded = model(images)  # image_features (b, D), image_embs (b, n, width)
        tokens = torch.full((images.shape[0], 1), sot, dtype=torch.long, device=images.device)
        finished = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(max_length - 2):  # room for the end token
            logits = model(images, tokens, image_latent=encoded["image_features"],
                           image_embs=encoded["image_embs"], output_labels=False)["logits"]
            next_token = logits[:, -1].argmax(dim=-1)  # (b,)
            next_token = next_token.masked_fill(finished, eot)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (b, T)
            finished |= next_token == eot
            if finished.all():
                break
    finally:
        model.train(was_training)

    captions = []
    for row in tokens[:, 1:].tolist():
        if eot in row:
            row = row[: row.index(eot)]
        captions.append(tokenizer.decode(row).strip())
    return captions
