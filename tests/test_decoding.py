"""One decoding rule (`bgmask.data.images`): an EXIF-rotated JPEG and grayscale / CMYK / palette / RGBA /
16-bit files give the same upright RGB to the classifier, `make-masked`, the `make-binary-seg` export as
OpenCV and MMSeg's loading transforms read it, and the segmenter's input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgmask.data.binary_seg import make_binary_seg
from bgmask.data.cub import CUBDataset, MaskSource, load_mask, load_rgb, read_cub_metadata
from bgmask.data.images import ORIENTATION, orientation, upright_size
from bgmask.errors import UserError
from bgmask.masking.make_masked import make_masked
from bgmask.seg.segmenter import _rgb_array
from conftest import write_tiny_cub

cv2 = pytest.importorskip("cv2")

W, H = 48, 32  # upright size; 8-aligned blocks keep JPEG edges exact at a mid threshold
RED, BLUE = (220, 20, 20), (20, 60, 200)


def upright_bird() -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) blue image with a red L-shaped bird (asymmetric: any rotation shows), and its mask."""
    mask = np.zeros((H, W), np.uint8)
    mask[8:16, 8:32] = 255
    mask[16:24, 8:16] = 255
    img = np.empty((H, W, 3), np.uint8)
    img[:] = BLUE
    img[mask > 0] = RED
    return img, mask


def is_red(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 120) & (rgb[..., 2] < 110)


def replace_image(root: Path, img_id: int, image: Image.Image, mask: np.ndarray, suffix: str = ".jpg",
                  **save_kwargs) -> str:
    """Put `image` (saved with `save_kwargs`) and the upright `mask` in place of image `img_id`."""
    lines = (root / "images.txt").read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.split(" ")[0] == str(img_id))
    old = lines[i].split(" ", 1)[1]
    (root / "images" / old).unlink()
    (root / "segmentations" / old).with_suffix(".png").unlink()
    rel = str(Path(old).with_suffix(suffix))
    lines[i] = f"{img_id} {rel}"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    image.save(root / "images" / rel, **save_kwargs)
    Image.fromarray(mask).save((root / "segmentations" / rel).with_suffix(".png"))
    return rel


def rotated_jpeg(root: Path, img_id: int = 1) -> str:
    """Image `img_id` becomes a JPEG stored rotated with EXIF Orientation=6 (display: rotate 90 cw)."""
    img, mask = upright_bird()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = Image.fromarray(img).transpose(Image.Transpose.ROTATE_90)  # (W, H) swapped on disk
    return replace_image(root, img_id, stored, mask, exif=exif.tobytes(), quality=95, subsampling=0)


@pytest.fixture
def cub(tmp_path):
    return write_tiny_cub(tmp_path / "CUB_200_2011")


def test_rotated_jpeg_classifier_image_and_mask_line_up(cub):
    rel = rotated_jpeg(cub)
    assert Image.open(cub / "images" / rel).size == (H, W) and upright_size(cub / "images" / rel) == (W, H)
    ds = CUBDataset(cub, "train", masks=MaskSource("gt"))
    rec = ds[ds.ids.index(1)]
    rgb, mask = np.asarray(rec["image"]), upright_bird()[1]
    assert rgb.shape == (H, W, 3)
    assert np.array_equal(is_red(rgb), mask > 0) and np.array_equal(rec["mask"], (mask > 0).astype(np.uint8))


def test_rotated_jpeg_binary_seg_export_is_upright_for_opencv_and_mmseg(cub, tmp_path):
    rel = rotated_jpeg(cub)
    make_binary_seg(cub, tmp_path / "seg", val_fraction=0.0, progress=False)
    img_path, ann_path = tmp_path / "seg/images/train" / rel, tmp_path / "seg/annotations/train" / Path(rel).with_suffix(".png")
    with Image.open(img_path) as im:
        assert orientation(im) == 1 and im.size == (W, H)  # upright pixels, no rotation left to apply
    ann = cv2.imread(str(ann_path), cv2.IMREAD_UNCHANGED)
    bgr = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
    bgr_raw = cv2.imread(str(img_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    for image in (bgr[..., ::-1], bgr_raw[..., ::-1]):
        assert image.shape == (H, W, 3) and np.array_equal(is_red(image), ann == 1)
    assert np.array_equal(ann == 1, upright_bird()[1] > 0)
    # MMSeg's own loading transforms (what the segmenter trains and is evaluated on)
    import bgmask.seg.dataset  # noqa: F401  (stand-in mmcv._ext before mmseg)
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import LoadAnnotations

    r = LoadImageFromFile()(dict(img_path=str(img_path)))
    r = LoadAnnotations()(dict(r, seg_map_path=str(ann_path), reduce_zero_label=False, seg_fields=[]))
    assert np.array_equal(is_red(r["img"][..., ::-1]), r["gt_seg_map"] == 1)


def test_rotated_jpeg_make_masked_is_upright(cub):
    rel = rotated_jpeg(cub)
    make_masked(cub, progress=False)
    out = np.asarray(Image.open(cub / "images_masked" / rel).convert("RGB"))
    assert out.shape == (H, W, 3)
    assert np.array_equal(is_red(out), upright_bird()[1] > 0) and out[~is_red(out)].max() < 40  # black elsewhere


def test_rotated_mask_follows_the_rule_and_size_mismatch_is_clear(tmp_path):
    _, mask = upright_bird()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "m.png", exif=exif.tobytes())
    assert np.array_equal(load_mask(tmp_path / "m.png", (W, H)), (mask > 0).astype(np.uint8))
    with pytest.raises(UserError, match=f"is {W}x{H} but its image is {W + 1}x{H}"):
        load_mask(tmp_path / "m.png", (W + 1, H))


def mode_files(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Files in other modes and the RGB the rule gives for each."""
    img, _ = upright_bird()
    base = Image.fromarray(img)
    out = {}
    tmp_path.mkdir(parents=True, exist_ok=True)

    def put(name, image, expected, **kw):
        image.save(tmp_path / name, **kw)
        out[name] = (tmp_path / name, expected)

    gray = np.asarray(base.convert("L"))
    put("gray.jpg", base.convert("L"), np.repeat(gray[..., None], 3, 2), quality=95)
    put("cmyk.jpg", base.convert("CMYK"), img, quality=95, subsampling=0)
    rgba = np.dstack([img, np.where(upright_bird()[1] > 0, 255, 0).astype(np.uint8)])
    put("rgba.png", Image.fromarray(rgba, "RGBA"), img)  # alpha dropped, stored colour kept
    pal = base.quantize(colors=4)
    pal.info["transparency"] = 0
    put("palette.png", pal, np.asarray(pal.convert("RGB")), transparency=0)
    la = Image.merge("LA", [base.convert("L"), Image.new("L", (W, H), 0)])
    put("la.png", la, np.repeat(gray[..., None], 3, 2))
    deep = (gray.astype(np.uint16) << 8) | 0xAB  # 16-bit gray; the rule keeps the high byte
    put("gray16.png", Image.fromarray(deep), np.repeat(gray[..., None], 3, 2))
    return out


def test_modes_load_as_the_same_rgb_everywhere(tmp_path):
    for name, (path, expected) in mode_files(tmp_path).items():
        rgb = np.asarray(load_rgb(path))
        assert rgb.shape == (H, W, 3), name
        tol = 6 if path.suffix == ".jpg" else 0
        assert np.abs(rgb.astype(int) - expected).max() <= tol, name
        with Image.open(path) as im:  # the segmenter's own conversion of an in-memory image
            assert np.array_equal(_rgb_array(im), rgb), name
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "gray16.png"))[..., 0],
                          np.asarray(Image.open(tmp_path / "gray16.png"), dtype=np.uint16) >> 8)


def test_modes_same_for_classifier_export_and_masked_copy(tmp_path):
    cub = write_tiny_cub(tmp_path / "CUB_200_2011", waterbirds=False)  # its copies would keep the old names
    files = mode_files(tmp_path / "src")
    full = np.full((H, W), 255, np.uint8)  # whole image = bird: the masked copy is the image itself
    rels = {}
    for img_id, (name, (path, _)) in enumerate(sorted(files.items()), start=1):
        with Image.open(path) as im:
            im.load()
            kw = {"transparency": 0} if name == "palette.png" else {"quality": 95, "subsampling": 0}
            rels[name] = replace_image(cub, img_id, im.copy(), full, suffix=path.suffix, **kw)
    meta = read_cub_metadata(cub)
    make_binary_seg(cub, tmp_path / "seg", val_fraction=0.0, progress=False)
    make_masked(cub, progress=False)
    datasets = {s: CUBDataset(cub, s, masks=MaskSource("gt")) for s in ("train", "test")}
    for name, rel in rels.items():
        img_id = next(i for i in meta.ids if meta.relpaths[i] == rel)
        split = "train" if meta.is_train[img_id] else "test"
        ds = datasets[split]
        classifier = np.asarray(ds[ds.ids.index(img_id)]["image"]).astype(int)
        assert np.array_equal(classifier, np.asarray(load_rgb(cub / "images" / rel))), name
        exported = cv2.imread(str(tmp_path / "seg/images" / split / rel), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
        masked = np.asarray(Image.open(cub / "images_masked" / rel).convert("RGB")).astype(int)
        for other in (exported, masked):
            assert other.shape == classifier.shape and np.abs(other - classifier).max() <= 6, name


# ---------------------------------------------------------------- real-data quirks in make-synthetic

SYNTH = ["--num_classes", "3", "--train_per_class", "4", "--test_per_class", "2", "--image_size", "48", "--seed", "1"]
QUIRKS = ["--varied_sizes", "--grayscale_fraction", "0.3", "--cmyk_fraction", "0.3"]


def make_synthetic(out: Path, *flags: str) -> Path:
    from bgmask.apps.cli import main as cli_main

    assert cli_main(["make-synthetic", "--out", str(out), *SYNTH, *flags]) == 0
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("quirky") / "synth", *QUIRKS)


def test_synthetic_quirks_sizes_modes_and_masks(quirky):
    meta = read_cub_metadata(quirky)
    sizes, modes = set(), set()
    for i in meta.ids:
        rel = meta.relpaths[i]
        for folder in ("images", "waterbird_complete95_forest2water2") if not meta.is_train[i] else ("images",):
            with Image.open(quirky / folder / rel) as im:
                sizes.add(im.size)
                modes.add(im.mode)
        with Image.open(quirky / "segmentations" / rel.replace(".jpg", ".png")) as m:
            assert m.size == upright_size(quirky / "images" / rel)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert all(max(w, h) <= 48 and abs(min(w, h) / max(w, h) - 0.75) < 0.05 for w, h in sizes)
    assert {"L", "CMYK", "RGB"} <= modes
    for split in ("train", "test"):
        ds = CUBDataset(quirky, split, masks=MaskSource("gt"))
        for k in range(len(ds)):
            rec = ds[k]
            assert rec["image"].mode == "RGB" and rec["mask"].shape == rec["image"].size[::-1]


def test_synthetic_quirks_deterministic_and_default_unchanged(quirky, tmp_path):
    assert tree_bytes(make_synthetic(tmp_path / "again", *QUIRKS)) == tree_bytes(quirky)
    plain = tree_bytes(make_synthetic(tmp_path / "plain"))
    off = tree_bytes(make_synthetic(tmp_path / "off", "--grayscale_fraction", "0", "--cmyk_fraction", "0"))
    assert plain == off and "varied_sizes" not in plain["synthetic_config.json"].decode()
    with Image.open(tmp_path / "plain/images" / read_cub_metadata(tmp_path / "plain").relpaths[1]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_synthetic_quirks_bad_fractions_are_one_line(tmp_path):
    from bgmask.data.synthetic import Quirks, generate_synthetic

    with pytest.raises(UserError, match="grayscale_fraction \\+ cmyk_fraction must be <= 1"):
        generate_synthetic(tmp_path / "x", num_classes=2, train_per_class=1, test_per_class=1,
                           quirks=Quirks(False, 0.7, 0.6), progress=False)
    assert not (tmp_path / "x").exists()


def test_train_one_epoch_on_quirky_synthetic(quirky, tmp_path):
    import json

    from bgmask.apps.scripts import train_early

    run = tmp_path / "run"
    argv = ["--data_path", str(quirky), "--image_size", "32", "--batch_size", "8", "--num_workers", "0",
            "--snapshot_dir", str(run), "--no_progress", "--augmentations_to_use", "flip", "--threads", "1",
            "--model_arch", "bgmask_resnet_tiny", "--epochs", "1", "--strategy", "early"]
    assert train_early(argv) == 0
    final = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "final" and final["test/num_samples"] == 6 and final["waterbirds/num_samples"] == 6
