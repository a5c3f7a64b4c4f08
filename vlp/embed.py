"""`vlp embed`: batched embeddings of an image folder or shards, and of texts, into parquet.

One row per image or text, for retrieval applications (a vector index, a notebook):

    modality   string        "image" | "text"
    id         string        image: path relative to the folder, or the shard sample's key;
                             text: its line number in the file (1-based)
    path       string        image: the file or shard it came from; text: null
    text       string        text: the text; image: null
    embedding  list<float32> L2-normalised, from the checkpoint's encode_image / encode_text

The file's schema metadata names the checkpoint (`vlp.checkpoint`) and the width
(`vlp.embed_dim`). Unreadable images are skipped, counted and reported, never fatal.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SHARD_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
Row = tuple[str, str, torch.Tensor | None]  # (id, path, preprocessed image or None if unreadable)


@dataclass
class EmbedResult:
    out: Path
    num_images: int = 0
    num_texts: int = 0
    skipped: list[str] = field(default_factory=list)
    """Images that could not be read, as `path: reason`."""


def _open_image(data: bytes | Path) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.convert("RGB")


class ImageFolder(Dataset):
    """Every image file under `root` (recursively, in sorted order), preprocessed."""

    def __init__(self, root: Path, preprocess: Callable):
        self.root = root
        self.paths = sorted(p for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Row, str | None]:
        path = self.paths[index]
        ident = path.relative_to(self.root).as_posix()
        try:
            return (ident, str(path), self.preprocess(_open_image(path))), None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return (ident, str(path), None), f"{path}: {err}"


class ShardImages(IterableDataset):
    """The images of webdataset shards (first of jpg/jpeg/png/webp per sample), preprocessed;
    each DataLoader worker reads its own shards."""

    def __init__(self, urls: list[str], preprocess: Callable):
        self.urls = urls
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[tuple[Row, str | None]]:
        import webdataset as wds

        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        errors: list[str] = []

        def on_error(exn: Exception) -> bool:
            errors.append(f"unreadable tar data: {exn}")
            return True

        shards = ({"url": url} for url in urls)
        for sample in wds.tarfile_to_samples(handler=on_error)(shards):
            while errors:
                yield ("", "", None), errors.pop()
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
            if key is None:
                continue  # not an image sample (e.g. a stray metadata member)
            try:
                image = self.preprocess(_open_image(sample[key]))
                yield (sample["__key__"], str(sample["__url__"]), image), None
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                yield (sample["__key__"], str(sample["__url__"]), None), f"{where}: {err}"
        while errors:
            yield ("", "", None), errors.pop()


def _collate(items: list[tuple[Row, str | None]]) -> tuple[list[Row], list[str]]:
    rows = [row for row, error in items if error is None]
    return rows, [error for _, error in items if error is not None]


def read_texts(path: Path) -> list[tuple[str, str]]:
    """`(line number, text)` for each non-blank line of a UTF-8 file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"--texts: {path} is not UTF-8 text ({err})") from None
    return [(str(i), line.strip()) for i, line in enumerate(lines, 1) if line.strip()]


def _schema(embed_dim: int, checkpoint: Path) -> Any:
    import pyarrow as pa

    return pa.schema(
        [("modality", pa.string()), ("id", pa.string()), ("path", pa.string()),
         ("text", pa.string()), ("embedding", pa.list_(pa.float32()))],
        metadata={"vlp.checkpoint": str(checkpoint), "vlp.embed_dim": str(embed_dim),
                  "vlp.normalized": "true"},
    )


def _batch(schema: Any, modality: str, ids: list[str], paths: list[str | None],
           texts: list[str | None], embeddings: torch.Tensor) -> Any:
    import pyarrow as pa

    values = pa.array(embeddings.float().cpu().numpy().reshape(-1), type=pa.float32())
    lists = pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1]).cast(
        pa.list_(pa.float32()))
    return pa.record_batch([pa.array([modality] * len(ids)), pa.array(ids, pa.string()),
                            pa.array(paths, pa.string()), pa.array(texts, pa.string()), lists],
                           schema=schema)


def embed_to_parquet(
    checkpoint: str | Path,
    *,
    out: str | Path,
    images: str | None = None,
    texts: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> EmbedResult:
    """Embed `images` (a folder, or a webdataset shard spec with braces and `::`) and/or `texts`
    (a file, one text per line) with the model of `checkpoint`; write them to parquet `out`."""
    import pyarrow.parquet as pq

    from vlp.data.pipeline import expand_shards
    from vlp.models.loading import load

    if images is None and texts is None:
        raise ValueError("nothing to embed: give --images and/or --texts")
    if texts is not None and not Path(texts).is_file():
        raise FileNotFoundError(f"--texts: no such file {texts}")
    text_rows = read_texts(Path(texts)) if texts is not None else []
    if images is not None and not Path(images).is_dir():
        missing = [u for u in expand_shards(images) if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"--images: {missing[0]} is neither a folder nor a shard")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer = load(checkpoint, device=device)
    from vlp.checkpoint import resolve_checkpoint

    schema = _schema(model.embed_dim, resolve_checkpoint(checkpoint))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    result = EmbedResult(out)
    with pq.ParquetWriter(tmp, schema) as writer, torch.no_grad():
        if images is not None:
            folder = Path(images).is_dir()
            dataset = (ImageFolder(Path(images), preprocess) if folder
                       else ShardImages(expand_shards(images), preprocess))
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                collate_fn=_collate)
            bar = tqdm(total=len(dataset) if folder else None, desc="images", unit="img",
                       disable=not progress)
            for rows, errors in loader:
                result.skipped += errors
                for error in errors:
                    log.warning("skipping image %s", error)
                bar.update(len(rows) + len(errors))
                if not rows:
                    continue
                batch = torch.stack([image for _, _, image in rows]).to(device)
                embeddings = model.encode_image(batch)
                writer.write_batch(_batch(schema, "image", [r[0] for r in rows],
                                          [r[1] for r in rows], [None] * len(rows), embeddings))
                result.num_images += len(rows)
            bar.close()
        for start in tqdm(range(0, len(text_rows), batch_size), desc="texts", unit="batch",
                          disable=not progress or not text_rows):
            chunk = text_rows[start:start + batch_size]
            embeddings = model.encode_text(tokenizer([t for _, t in chunk]).to(device))
            writer.write_batch(_batch(schema, "text", [i for i, _ in chunk], [None] * len(chunk),
                                      [t for _, t in chunk], embeddings))
            result.num_texts += len(chunk)
    tmp.replace(out)
    return result
