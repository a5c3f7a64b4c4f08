"""Export a vlp checkpoint for use without vlp: open_clip's `local-dir:` format or transformers.

    vlp export --checkpoint runs/x --format open_clip --out DIR
        open_clip.create_model_and_transforms("local-dir:DIR"), open_clip.get_tokenizer("local-dir:DIR")
    vlp export --checkpoint runs/x --format hf --out DIR
        transformers.CLIPModel.from_pretrained(DIR), CLIPProcessor.from_pretrained(DIR)

With `--gap-reference ROOT` (a zero-shot or retrieval benchmark root) the export also holds
`modality_means.json`: the mean image and mean text embedding of that root's matched pairs, for
applications that remove the modality gap as `vlp.eval.gap_removal` does (GR-CLIP).

Both read only the checkpoint (`vlp.models.loading`, after checking it against its manifest)
and write to `DIR.tmp` first, renamed into place when complete, with the file mode the umask
gives new files. The transformers export needs an architecture that is a `CLIPModel`
(`vlp.models.hf_clip.incompatibilities` says why not otherwise); its tokenizer files are
written from open_clip's bundled BPE vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

from vlp.checkpoint import give_default_mode, save_tensors
from vlp.models.hf_clip import clip_config, incompatibilities, to_hf_state_dict
from vlp.models.hf_text import open_clip_knows, read_hf_config, tokenizer_files
from vlp.models.loading import LoadedCheckpoint, open_checkpoint

FORMATS: tuple[str, ...] = ("open_clip", "hf")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
"""The first name open_clip looks for in a `local-dir:` folder."""
_HF_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values
_SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


class ExportError(ValueError):
    """The checkpoint cannot be written in the asked format; the message says what does not map."""


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, format: str, overwrite: bool = False,
    verify: bool = True, gap_reference: str | Path | None = None,
) -> Path:
    """Write the model of `checkpoint` (or a run folder's latest) to folder `out` in `format`,
    once its files match its manifest (unless `verify` is False); with `gap_reference`, also
    that benchmark root's modality means (`write_modality_means`)."""
    if format not in FORMATS:
        raise ExportError(f"--format: unknown {format!r}; known: {', '.join(FORMATS)}")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    loaded = open_checkpoint(checkpoint, verify=verify)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (export_open_clip if format == "open_clip" else export_hf)(loaded, tmp, final=out)
        if gap_reference is not None:
            write_modality_means(loaded, Path(gap_reference), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_modality_means(loaded: LoadedCheckpoint, reference: Path, folder: Path) -> Path:
    """`modality_means.json` in `folder`: the means of the model's embeddings of `reference`'s
    matched (image, text) pairs (`vlp.eval.gap.matched_pairs`), on the CPU."""
    from vlp.eval.gap import matched_pairs
    from vlp.eval.gap_removal import GAP_MEANS_FILE, ModalityMeans

    try:
        image, text, source = matched_pairs(loaded.model, loaded.tokenizer, loaded.preprocess,
                                            reference, progress=False)
    except (OSError, ValueError) as err:
        raise ExportError(f"--gap-reference: {err}") from None
    return ModalityMeans.of(image, text).save(folder / GAP_MEANS_FILE,
                                              reference=f"{reference} ({source})")


def _weights(loaded: LoadedCheckpoint) -> dict[str, Any]:
    return {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}


def export_open_clip(loaded: LoadedCheckpoint, folder: Path, *, final: Path) -> None:
    """`open_clip_config.json` (model_cfg + preprocess_cfg) and `open_clip_model.safetensors`.

    A transformers text tower's config and tokenizer files go beside them, and `text_cfg`
    names the export folder (`final`, absolute) as both model and tokenizer: open_clip reads a
    `local-dir:` tokenizer from that folder, and builds the tower from its `config.json`.
    """
    spec = loaded.spec
    model_cfg = json.loads(json.dumps(spec.model_cfg))
    text_type = spec.text.get("type")
    if text_type == "open_clip":
        raise ExportError(
            f"the tokenizer of {spec.name!r} is chosen by open_clip from the model name, which a "
            "local-dir: folder does not carry; export to open_clip only models with CLIP's BPE "
            "or a transformers tokenizer")
    text_cfg = model_cfg.setdefault("text_cfg", {})
    if spec.text_tower is not None:
        model_type = read_hf_config(spec.text_tower).get("model_type")
        if not open_clip_knows(model_type):
            raise ExportError(
                f"open_clip cannot build a transformers text tower of model_type {model_type!r} "
                "by itself (open_clip.hf_configs.arch_dict has no entry for it); load the "
                "checkpoint with vlp.load instead")
        for path in tokenizer_files(spec.text_tower):
            shutil.copyfile(path, folder / path.name)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(final)
    text_cfg["context_length"] = spec.text["context_length"]
    config = {"model_cfg": model_cfg, "preprocess_cfg": spec.preprocess_cfg}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    save_tensors(_weights(loaded), folder / OPEN_CLIP_WEIGHTS, metadata={"format": "pt"})


def check_hf_exportable(loaded: LoadedCheckpoint) -> None:
    """Raise `ExportError` listing every part of the model that transformers CLIPModel lacks."""
    spec = loaded.spec
    problems = incompatibilities(spec.model_cfg, spec.model_kwargs)
    if spec.text_tower is None and (spec.text.get("type") != "clip_bpe"
                                    or spec.text.get("kwargs")):
        problems.append(f"tokenizer {spec.text} (CLIPTokenizer is CLIP's plain BPE)")
    resize_mode = spec.preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        problems.append(f"preprocess resize_mode={resize_mode!r} (CLIPImageProcessor resizes the "
                        "shortest side or squashes)")
    if spec.preprocess_cfg.get("interpolation", "bicubic") not in _HF_RESAMPLE:
        problems.append(f"preprocess interpolation={spec.preprocess_cfg['interpolation']!r}")
    if problems:
        raise ExportError(f"{loaded.path}: model {spec.name!r} does not map onto transformers "
                          f"CLIPModel: {'; '.join(problems)}. Use --format open_clip instead.")


def export_hf(loaded: LoadedCheckpoint, folder: Path, *, final: Path) -> None:
    """A transformers CLIPModel folder: config.json, model.safetensors, tokenizer and processor."""
    from transformers import CLIPConfig, CLIPModel

    check_hf_exportable(loaded)
    spec = loaded.spec
    model = CLIPModel(CLIPConfig(**clip_config(spec.model_cfg)))
    missing, unexpected = model.load_state_dict(to_hf_state_dict(_weights(loaded)), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"{loaded.path}: weights do not map onto CLIPModel: missing {missing}, "
                          f"unexpected {unexpected}")
    model.save_pretrained(folder)
    build_clip_processor(spec.preprocess_cfg, context_length=spec.text["context_length"]) \
        .save_pretrained(folder)
    give_default_mode(*(p for p in folder.rglob("*") if p.is_file()))  # safetensors wrote 0600


def build_clip_processor(preprocess_cfg: dict[str, Any], *, context_length: int) -> Any:
    """transformers `CLIPProcessor` equal to open_clip's preprocessing and tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    size = preprocess_cfg["size"]
    side = size[0] if isinstance(size, (list, tuple)) else size
    squash = preprocess_cfg.get("resize_mode", "shortest") == "squash"
    image_processor = CLIPImageProcessor(
        size={"height": side, "width": side} if squash else {"shortest_edge": side},
        crop_size={"height": side, "width": side}, do_center_crop=not squash,
        resample=_HF_RESAMPLE[preprocess_cfg.get("interpolation", "bicubic")],
        image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]),
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor,
                         tokenizer=build_clip_tokenizer(context_length=context_length))


def build_clip_tokenizer(*, context_length: int) -> Any:
    """transformers `CLIPTokenizer` from open_clip's bundled BPE file (no download): the same
    vocabulary (ids 0..49407) and merges as open_clip's `SimpleTokenizer`."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # as SimpleTokenizer
    reference = open_clip.SimpleTokenizer()
    vocab = {_SPECIAL_TOKENS.get(token, token): i for token, i in reference.encoder.items()}
    assert len(vocab) == len(bytes_to_unicode()) * 2 + len(merges) + 2
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
