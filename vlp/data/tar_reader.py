"""One webdataset tar shard read as samples, with every unusable sample counted exactly once.

webdataset's own `tarfile_to_samples` ends a shard at its first bad tar header without saying
so (the rest of the shard is lost in silence), reports a truncated member several times, and
starts a second sample when a key comes back later in the same shard. This reader:

- reads past an unreadable header: tar headers sit on 512-byte blocks and carry a checksum, so
  it skips to the next block that is a valid header (tarfile's `ignore_zeros`) and goes on,
  noting where blocks failed as headers;
- marks a sample *damaged* when one of its own members is lost: a truncated member, the same
  member name twice, unreadable data between two of its members;
- counts unreadable data between two samples as one lost sample, unless a neighbouring sample
  is incomplete (no image or no caption): then that sample carries the loss, because a garbled
  header takes one member of one sample with it, and counting both would count it twice;
- uses the first sample of a key and marks a later one with the same key in that shard as a
  duplicate.

A sample is a dict of member bytes by lower-case extension plus `__key__` and `__url__`; one
that must be skipped carries its reason under `DAMAGE`, which `decode_sample` turns into the
skip. Unreadable data is a sample too (key `?`), so that it is counted where it happens.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import webdataset as wds

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DAMAGE = "__damage__"
SKIPPED_NAMES = re.compile(r"__[^/]*__($|/)")
"""Metadata members webdataset skips too (`__index__`, ...)."""


@dataclass
class _Member:
    name: str
    data: bytes
    error: str | None = None


@dataclass
class _Gap:
    reason: str


def is_usable_shape(sample: dict[str, Any]) -> bool:
    """Not damaged, and has an image member and a caption."""
    return (DAMAGE not in sample and "txt" in sample
            and any(ext in sample for ext in IMAGE_EXTENSIONS))


class _CheckedTarInfo(tarfile.TarInfo):
    """Notes on its TarFile the offset of every block that fails as a header (bad checksum or
    fields), which `ignore_zeros` then skips; zero blocks are not damage and are not noted."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.InvalidHeaderError:
            tar.__dict__.setdefault("bad_blocks", []).append(tar.offset)
            raise


def _members(fileobj: BinaryIO) -> Iterator[_Member | _Gap]:
    """Regular members in order, and a `_Gap` wherever blocks between them could not be read."""
    tar = tarfile.open(fileobj=fileobj, mode="r|*", ignore_zeros=True, tarinfo=_CheckedTarInfo)
    bad_blocks: list[int] = tar.__dict__.setdefault("bad_blocks", [])
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError, OSError) as e:
            yield _Gap(f"the shard ends early, at byte {tar.offset} ({e})")
            return
        if bad_blocks:
            end = f"-{info.offset}" if info is not None else " to the end"
            yield _Gap(f"unreadable tar data at bytes {bad_blocks[0]}{end}")
            bad_blocks.clear()
        if info is None:
            return
        if not info.isreg() or SKIPPED_NAMES.match(info.name):
            continue
        try:
            data = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            yield _Member(info.name, b"", error=f"member {info.name} is truncated ({e})")
            return
        tar.members = []  # stream mode: keep no index of past members
        yield _Member(info.name, data)


def _gap_sample(url: str, reason: str) -> dict[str, Any]:
    return {"__key__": "?", "__url__": url, DAMAGE: f"{reason} (counted as one lost sample)"}


def group_samples(url: str, items: Iterator[_Member | _Gap]) -> Iterator[dict[str, Any]]:
    """Members (consecutive names with the same key) into samples; gaps attributed as above."""
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    gap_before: str | None = None  # unreadable data just before `current`, not yet counted
    gap_after: str | None = None  # unreadable data since `current`'s last member

    def close() -> Iterator[dict[str, Any]]:
        if current is not None:
            if gap_before is not None and is_usable_shape(current):
                yield _gap_sample(url, gap_before)
            yield current

    for item in items:
        if isinstance(item, _Gap):
            gap_after = gap_after or item.reason
            continue
        key, ext = wds.tariterators.base_plus_ext(item.name)
        if key is None:
            continue  # no extension: not a member of any sample
        ext = ext.lower()
        if current is not None and key == current["__key__"]:
            if gap_after is not None:
                current[DAMAGE] = f"one of its members is unreadable ({gap_after})"
            elif ext in current:
                current[DAMAGE] = f"member {item.name} appears twice"
            gap_after = None
        else:
            yield from close()
            previous_usable = current is None or is_usable_shape(current)
            gap_before = gap_after if previous_usable else None
            gap_after = None
            current = {"__key__": key, "__url__": url}
            if key in seen:
                current[DAMAGE] = f"duplicate key {key}: a sample with this key came earlier"
            seen.add(key)
        current.setdefault(ext, item.data)
        if item.error is not None:
            current[DAMAGE] = item.error
    yield from close()
    if gap_after is not None and (current is None or is_usable_shape(current)):
        yield _gap_sample(url, gap_after)


def read_shard(url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The samples of one shard (a path, URL or `pipe:` command, as webdataset opens them).
    A shard that cannot be opened or read at all, or a `pipe:` command that fails after its
    output was read, goes to `on_error`, once."""
    try:
        stream = wds.gopen(url)
    except Exception as e:  # gopen raises whatever its transport raises
        on_error(ValueError(f"cannot open shard {url}: {e}"))
        return
    reported = False
    try:
        for sample in group_samples(url, _members(stream)):
            reported = sample["__key__"] == "?"  # a failing stream ends with a gap sample
            yield sample
    except (tarfile.TarError, OSError, EOFError) as e:  # not a tar stream at all
        reported = True
        on_error(ValueError(f"cannot read shard {url}: {e}"))
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command's non-zero exit status
            if not reported:
                on_error(ValueError(f"shard {url}: {e}"))
