"""A model trained by `vlp train` goes out and comes back: vlp.load, exports that open_clip and
transformers load in a process where vlp cannot be imported, `vlp embed`, the README example."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlp
from vlp.checkpoint import latest_checkpoint
from vlp.cli import main
from vlp.models import build_model

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a small red circle above a blue star", "a large green square", "a cross"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A vlp-tiny trained for 3 steps on a small ShapesWorld, through the real command line."""
    tmp = tmp_path_factory.mktemp("train")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlp", "train", str(ROOT / "recipes" / "shapesworld-tiny.yaml"),
         "model.name=vlp-tiny", "train.steps=3", "data.synth.num_train=600", "data.synth.num_eval=64",
         "data.synth.samples_per_shard=300", "data.batch_size=16", "data.num_workers=0",
         f"output_dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
         "train.trackers=[jsonl]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def images(run) -> Path:
    """A folder of six ShapesWorld images from the zero-shot set."""
    folder = run.parent / "images"
    folder.mkdir()
    shard = next((run.parent / "cache").glob("shapesworld-*/zeroshot/test/0.tar"))
    with tarfile.open(shard) as tar:
        for member in [m for m in tar.getmembers() if m.name.endswith(".png")][:6]:
            (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return folder


def pixels(folder: Path, preprocess) -> torch.Tensor:
    paths = sorted(folder.glob("*.png"))
    return torch.stack([preprocess(Image.open(p)) for p in paths])


def test_vlp_load_matches_the_model_rebuilt_by_hand(run, images):
    ckpt = latest_checkpoint(run)
    by_hand = build_model("vlp-tiny").model.eval()
    by_hand.load_state_dict(load_file(ckpt / "model.safetensors"))
    model, preprocess, tokenizer = vlp.load(run)
    x = pixels(images, preprocess)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), by_hand.encode_image(x, normalize=True),
                                   rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(tokenizer(TEXTS)),
                                   by_hand.encode_text(tokenizer(TEXTS), normalize=True),
                                   rtol=0, atol=0)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3


# Runs in a fresh `python -I` whose import system has vlp's editable install removed, so any
# `import vlp` (by the code under test or by accident) fails there.
ISOLATED = r'''
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and p not in ("", ROOT)]
sys.path_importer_cache.clear()
try:
    import vlp
    raise SystemExit("vlp is importable: the check is void")
except ModuleNotFoundError:
    pass
import open_clip, torch, transformers
from PIL import Image
from safetensors.torch import load_file, save_file
inputs = load_file(INPUTS)
paths = sorted(__import__("pathlib").Path(IMAGES).glob("*.png"))
pil = [Image.open(p) for p in paths]
out = {}
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + OPEN_CLIP)
tokenizer = open_clip.get_tokenizer("local-dir:" + OPEN_CLIP)
model.eval()
with torch.no_grad():
    out["oc_image"] = model.encode_image(inputs["pixels"], normalize=True)
    out["oc_pil"] = model.encode_image(torch.stack([preprocess(i) for i in pil]), normalize=True)
    out["oc_text"] = model.encode_text(tokenizer(TEXTS), normalize=True)
clip = transformers.CLIPModel.from_pretrained(HF).eval()
processor = transformers.CLIPProcessor.from_pretrained(HF)
tensor = lambda o: o if torch.is_tensor(o) else o.pooler_output
with torch.no_grad():
    out["hf_image"] = tensor(clip.get_image_features(pixel_values=inputs["pixels"]))
    batch = processor(text=TEXTS, images=pil, return_tensors="pt", padding=True)
    out["hf_pil"] = tensor(clip.get_image_features(pixel_values=batch["pixel_values"]))
    out["hf_text"] = tensor(clip.get_text_features(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]))
save_file({k: v.contiguous() for k, v in out.items()}, RESULT)
print("vlp-free:", "vlp" not in sys.modules)
'''


def test_exports_give_the_same_embeddings_in_open_clip_and_transformers_without_vlp(
        run, images, tmp_path):
    exports = tmp_path / "exports"
    for fmt in ("open_clip", "hf"):
        assert main(["export", "--checkpoint", str(run), "--format", fmt,
                     "--out", str(exports / fmt)]) == 0
    model, preprocess, tokenizer = vlp.load(run)
    x = pixels(images, preprocess)
    with torch.no_grad():
        expected_image, expected_text = model.encode_image(x), model.encode_text(tokenizer(TEXTS))
    save_file({"pixels": x.contiguous()}, tmp_path / "inputs.safetensors")
    constants = {"ROOT": str(ROOT), "INPUTS": str(tmp_path / "inputs.safetensors"),
                 "IMAGES": str(images), "OPEN_CLIP": str(exports / "open_clip"),
                 "HF": str(exports / "hf"), "TEXTS": TEXTS,
                 "RESULT": str(tmp_path / "result.safetensors")}
    script = "".join(f"{k} = {v!r}\n" for k, v in constants.items()) + ISOLATED
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "vlp-free: True" in proc.stdout

    got = load_file(tmp_path / "result.safetensors")
    normalize = torch.nn.functional.normalize
    # open_clip runs the very same modules: equal up to float summation order (none here).
    torch.testing.assert_close(got["oc_image"], expected_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["oc_pil"], expected_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["oc_text"], expected_text, rtol=0, atol=1e-6)
    # transformers computes attention its own way (separate q/k/v, SDPA): agree within 1e-5.
    torch.testing.assert_close(normalize(got["hf_image"], dim=-1), expected_image,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize(got["hf_pil"], dim=-1), expected_image,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize(got["hf_text"], dim=-1), expected_text,
                               rtol=0, atol=1e-5)


def test_embed_writes_a_parquet_row_per_image_and_text(run, images, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"not a png")  # skipped and counted, not fatal
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n")
    out = tmp_path / "emb.parquet"

    code = main(["embed", "--checkpoint", str(run), "--images", str(folder),
                 "--texts", str(texts), "--out", str(out), "--batch-size", "4", "--quiet"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 6 image and 2 text embeddings to" in printed
    assert "skipped 1 unreadable images" in printed
    table = pq.read_table(out)
    rows = table.to_pydict()
    assert rows["modality"] == ["image"] * 6 + ["text"] * 2
    assert rows["id"][:6] == sorted(p.name for p in images.glob("*.png"))[:6]
    assert rows["id"][6:] == ["1", "3"] and rows["text"][6:] == TEXTS[:2]
    assert rows["path"][6:] == [None, None] and rows["text"][:6] == [None] * 6
    assert table.schema.metadata[b"vlp.embed_dim"] == b"128"
    model, preprocess, tokenizer = vlp.load(run)
    embeddings = torch.tensor(rows["embedding"])
    with torch.no_grad():
        torch.testing.assert_close(embeddings[:6], model.encode_image(pixels(images, preprocess)))
        torch.testing.assert_close(embeddings[6:], model.encode_text(tokenizer(TEXTS[:2])))


def test_readme_search_example_runs_in_15_lines(run, images):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using a checkpoint"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 15
    code = code.replace('"runs/shapesworld-tiny"', repr(str(run)))
    code = code.replace('Path("images")', f"Path({str(images)!r})")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "README.md", "exec"), {})
    results = eval(stdout.getvalue(), {"PosixPath": Path, "WindowsPath": Path})
    assert len(results) == 5 and all(path.parent == images for path, _ in results)
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


def test_a_recipe_starting_from_a_tampered_checkpoint_stops_in_one_line(run, tmp_path, capsys):
    from accelerate.state import AcceleratorState, GradientState

    copy = tmp_path / "pretrained"
    shutil.copytree(run, copy)
    weights = latest_checkpoint(copy) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # 64 bytes of tensor data zeroed
    weights.write_bytes(bytes(data))
    try:
        code = main(["train", str(ROOT / "recipes" / "shapesworld-tiny.yaml"),
                     "model.name=vlp-tiny", f"model.pretrained={copy}", "train.steps=1",
                     "data.synth.num_train=600", "data.synth.num_eval=64",
                     "data.synth.samples_per_shard=300", "data.num_workers=0",
                     f"output_dir={tmp_path / 'finetune'}", f"data.cache_dir={run.parent / 'cache'}",
                     "train.trackers=[jsonl]"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlp train: error: ") and err.count("\n") == 1
    assert f"{weights}: sha256 differs from the manifest" in err
    assert not list((tmp_path / "finetune").glob("step-*"))
