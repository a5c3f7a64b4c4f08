"""vlp: CLIP-style vision-language pretraining."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from vlp.models.loading import Encoder

__version__ = "0.1.0"


def load(
    path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[Encoder, Callable, Callable]:
    """Load a trained model for inference: `model, preprocess, tokenizer = vlp.load(PATH)`.

    `path` is a checkpoint folder (`runs/x/step-000000400`) or a run folder (its latest
    checkpoint). The model is in eval mode on `device`; `model.encode_image(preprocess(img)[None])`
    and `model.encode_text(tokenizer(["a caption"]))` return L2-normalised embeddings (pass
    `normalize=False` for raw ones), so their dot product is a cosine similarity. Nothing is
    unpickled; a bad or missing file, or one that differs from the checkpoint's `manifest.json`
    (sha256), raises `CheckpointError` naming it. `verify=False` skips the hashing (it costs
    about one read of the weights) and loads a checkpoint that has no manifest.
    """
    from vlp.models.loading import load as load_checkpoint_folder

    return load_checkpoint_folder(path, device=device, verify=verify)
