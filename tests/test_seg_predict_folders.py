"""The output folders of bgmask.seg.predict (predicted masks, masked image copies) on the stage cache
(`Marker.claim`): resume keeps finished files, another segmenter or fill is refused in one line or
replaced with overwrite, stale temporary files go, and a folder without the marker is taken as it is.
A stand-in segmenter (no MMSeg): only the folder logic is under test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bgmask.data.synthetic import generate_synthetic
from bgmask.errors import UserError
from bgmask.seg import predict


class StandInSegmenter:
    """Bird = the pixels whose red channel has parity `k`: two `k` give two different segmenters."""

    def __init__(self, k: int):
        self.k = k

    def predict_images(self, images):
        return [((np.asarray(im)[..., 0].astype(int) + self.k) % 2).astype(np.uint8) for im in images]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub") / "cub"
    generate_synthetic(root, num_classes=2, image_size=32, train_per_class=3, test_per_class=2, seed=0,
                       progress=False)
    return root


@pytest.fixture
def segmenter(monkeypatch):
    """use(k): the segmenter that `_open_segmenter` returns from now on, with its provenance."""

    def use(k: int) -> None:
        info = {"checkpoint": f"/ckpt/{k}.pth", "checkpoint_sha256": f"sha-{k}", "config": None}
        monkeypatch.setattr(predict, "_open_segmenter", lambda opts: (StandInSegmenter(k), dict(info)))

    return use


def files(folder: Path, suffix: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(f"*{suffix}"))}


def test_mask_folder_resumes_refuses_and_replaces(cub, tmp_path, segmenter):
    out, opts = tmp_path / "masks", predict.SegmenterOptions(checkpoint="unused", progress=False)
    segmenter(0)
    first = predict.predict_mask_folder(cub, out, opts)
    assert first["predicted"] == first["total"] > 0
    assert (out / "predict_info.json").read_text() == json.dumps(
        {"checkpoint": "/ckpt/0.pth", "checkpoint_sha256": "sha-0", "config": None}, indent=2) + "\n"
    masks = files(out, ".png")
    victim = out / next(iter(masks))
    victim.unlink()
    stale = victim.parent / f".{victim.name}.999999-x.tmp"
    stale.write_bytes(b"half")
    again = predict.predict_mask_folder(cub, out, opts)
    assert (again["predicted"], again["skipped"]) == (1, first["total"] - 1)
    assert files(out, ".png") == masks and not stale.exists()
    segmenter(1)
    with pytest.raises(UserError) as refused:
        predict.predict_mask_folder(cub, out, opts)
    assert str(refused.value) == (f"{out} holds masks of another segmenter (/ckpt/0.pth); pass --overwrite to "
                                  "replace them or choose another --out_dir")
    (out / "notes.txt").write_text("the user's")
    replaced = predict.predict_mask_folder(cub, out, predict.SegmenterOptions(
        checkpoint="unused", progress=False, overwrite=True))
    assert replaced["predicted"] == first["total"] and (out / "notes.txt").read_text() == "the user's"
    assert files(out, ".png") != masks and json.loads((out / "predict_info.json").read_text())["checkpoint_sha256"] == "sha-1"


def test_masked_copies_compare_segmenter_and_fill(cub, tmp_path, segmenter):
    out, opts = tmp_path / "copies", predict.SegmenterOptions(checkpoint="unused", progress=False)
    segmenter(0)
    first = predict.mask_image_folder(cub / "images", out, opts)
    copies = files(out, ".jpg")
    assert first["predicted"] == len(copies) > 0
    assert predict.mask_image_folder(cub / "images", out, opts)["predicted"] == 0
    with pytest.raises(UserError) as refused:
        predict.mask_image_folder(cub / "images", out, opts, fill="mean")
    assert str(refused.value) == (f"{out} holds masked images of another segmenter or fill (/ckpt/0.pth, fill "
                                  "black); pass --overwrite to replace them or choose another --save_path")
    (out / "masked_copy.json").write_text("not JSON")  # unreadable: outputs of an unknown segmenter
    with pytest.raises(UserError, match=r"\(None, fill None\); pass --overwrite"):
        predict.mask_image_folder(cub / "images", out, opts)
    rewritten = predict.mask_image_folder(cub / "images", out, predict.SegmenterOptions(
        checkpoint="unused", progress=False, overwrite=True), fill="mean")
    assert rewritten["predicted"] == len(copies) and files(out, ".jpg").keys() == copies.keys()
    assert json.loads((out / "masked_copy.json").read_text())["fill"] == "mean"


def test_a_folder_without_the_marker_is_taken_as_it_is(cub, tmp_path, segmenter):
    """Its outputs count as finished and nothing in it is deleted (it may be the user's own folder)."""
    segmenter(0)
    out = tmp_path / "shared"
    src = sorted((cub / "images").glob("*/*.jpg"))[0]
    done = out / src.parent.name / src.name
    done.parent.mkdir(parents=True)
    done.write_bytes(b"finished before")
    (out / "notes.txt").write_text("the user's")
    s = predict.mask_image_folder(cub / "images", out, predict.SegmenterOptions(checkpoint="unused", progress=False))
    assert (s["predicted"], s["skipped"]) == (s["total"] - 1, 1)
    assert done.read_bytes() == b"finished before" and (out / "notes.txt").read_text() == "the user's"
    assert (out / "masked_copy.json").is_file()
