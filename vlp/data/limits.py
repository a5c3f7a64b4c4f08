"""Per-sample limits on untrusted shard contents: a bad sample is rejected, never fatal.

Web-scale shards hold whatever was crawled: megabyte "captions", images whose header claims
50,000×50,000 pixels (gigabytes once decoded), bytes that are not UTF-8. `read_caption` and
`read_image` turn each into a `ValueError` that the pipeline counts as a skipped sample. The
image size is checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

UTF8_MAX_BYTES_PER_CHAR = 4


@dataclass(frozen=True)
class SampleLimits:
    max_caption_chars: int = 65_536
    """Longest caption accepted, in characters (the tokenizer keeps only the first ~77 tokens)."""
    max_image_pixels: int = 8192 * 8192
    """Largest image accepted, in pixels (width × height) as its header declares them."""

    def __post_init__(self) -> None:
        for name in ("max_caption_chars", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be > 0, got {getattr(self, name)}")


DEFAULT_LIMITS = SampleLimits()


def read_caption(raw: bytes, limits: SampleLimits = DEFAULT_LIMITS) -> str:
    """The caption text of a `txt` member, stripped; ValueError if not usable."""
    if len(raw) > UTF8_MAX_BYTES_PER_CHAR * limits.max_caption_chars:
        raise ValueError(f"caption of {len(raw)} bytes is over data.max_caption_chars="
                         f"{limits.max_caption_chars}")
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption is not valid utf-8 ({e.reason} at byte {e.start})") from None
    if len(caption) > limits.max_caption_chars:
        raise ValueError(f"caption of {len(caption)} characters is over data.max_caption_chars="
                         f"{limits.max_caption_chars}")
    if not caption:
        raise ValueError("empty caption")
    return caption


def read_image(raw: bytes, limits: SampleLimits = DEFAULT_LIMITS) -> Image.Image:
    """The RGB image of an image member; ValueError if undecodable or over the pixel limit."""
    try:
        with warnings.catch_warnings():
            # Our own limit decides below; PIL still raises past twice its MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large: {e}") from None
    except Exception as e:  # PIL raises many types for bad bytes
        raise ValueError(f"undecodable image: {e}") from None
    with img:
        width, height = img.size
        if width * height > limits.max_image_pixels:
            raise ValueError(f"image of {width}x{height} pixels (from its header) is over "
                             f"data.max_image_pixels={limits.max_image_pixels}")
        try:
            return img.convert("RGB")
        except Exception as e:
            raise ValueError(f"undecodable image: {e}") from None
