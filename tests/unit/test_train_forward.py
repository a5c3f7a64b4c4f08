"""A training step's forward: what the model is given."""

import torch
from torch import nn

from vlp.models import build_model
from vlp.train.grad_cache import forward


class Recorder(nn.Module):
    """Records the memory format of the images and the captions it is called with."""

    def forward(self, image, text, **extra):
        self.channels_last = image.is_contiguous(memory_format=torch.channels_last)
        self.extra = sorted(extra)
        return {"image_features": image.flatten(1), "text_features": text.float()}


def test_images_reach_the_model_channels_last_and_hard_negatives_come_along():
    model = Recorder()
    batch = {"image": torch.randn(2, 3, 8, 8), "text": torch.ones(2, 4, dtype=torch.long),
             "neg_text": torch.ones(2, 3, 4, dtype=torch.long)}
    assert batch["image"].is_contiguous()  # as the data pipeline stacks them
    forward(model, batch, torch.device("cpu"))
    assert model.channels_last and model.extra == ["neg_text"]


def test_channels_last_images_give_the_same_features():
    torch.manual_seed(0)
    model = build_model("vlp-tiny-rn").model.eval()
    batch = {"image": torch.randn(4, 3, 64, 64), "text": torch.randint(0, 49408, (4, 32))}
    with torch.no_grad():
        output = forward(model, batch, torch.device("cpu"))
        plain = model(batch["image"], batch["text"])
    torch.testing.assert_close(output["image_features"], plain["image_features"],
                               rtol=1e-4, atol=1e-5)
