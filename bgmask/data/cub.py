"""CUB-200-2011 metadata and the dataset every strategy trains and evaluates on.

Works alike on the real CUB_200_2011 (+ Waterbirds) download and on the synthetic benchmark, which
uses the same layout:

    ROOT/images.txt                  <id> <relpath>
    ROOT/classes.txt                 <class_id> <NNN.Name>
    ROOT/image_class_labels.txt      <id> <class_id>
    ROOT/train_test_split.txt        <id> <1 = train, 0 = test>
    ROOT/images/<relpath>            RGB image
    ROOT/segmentations/<relpath with .png>    bird mask (0 = background, > 0 = bird)
    ROOT/waterbird_complete95_forest2water2/<relpath> + metadata.csv   (optional)

A record is a dict: image (3, H, W) float, label int, index int (position in the dataset, used for
exact distributed evaluation), img_id int, place int and group int (-1 when unknown), and, when masks
are asked for, mask (1, H, W) float in {0, 1} with 1 = bird.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from bgmask.errors import UserError, require_dir

WATERBIRDS_SUBDIR = "waterbird_complete95_forest2water2"
METADATA_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")
SPLITS = ("train", "val", "test")


def read_text(path: Path, what: str = "CUB metadata file") -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is one line naming file:line."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path} (expected the CUB_200_2011 layout)")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{lineno}: byte 0x{data[e.start]:02x} is not UTF-8 (expected UTF-8 text)") from None


def _read_pairs(path: Path) -> list[tuple[int, int, str]]:
    """(line number, id, value) of each `<id> <value>` line; an id given twice is an error."""
    rows, first_line = [], {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(" ", 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"{path}:{lineno}: expected '<integer id> <value>', got {line!r}")
        key = int(parts[0])
        if key in first_line:
            raise UserError(f"{path}:{lineno}: id {key} is already on line {first_line[key]} "
                            "(expected each id once)")
        first_line[key] = lineno
        rows.append((lineno, key, parts[1].strip()))
    if not rows:
        raise UserError(f"CUB metadata file is empty: {path}")
    return rows


def _read_int_column(path: Path, what: str, allowed: range, expected: str) -> dict[int, int]:
    """id -> value of a `<image id> <integer>` file whose values all lie in `allowed`."""
    out = {}
    for lineno, img_id, value in _read_pairs(path):
        if not value.isdigit() or int(value) not in allowed:
            raise UserError(f"{path}:{lineno}: {what} {value!r} of image {img_id} out of range (expected {expected})")
        out[img_id] = int(value)
    return out


@dataclass
class CUBMetadata:
    """The parsed metadata files. Labels are 0-based class indices."""

    root: Path
    ids: list[int]
    relpaths: dict[int, str]
    labels: dict[int, int]
    is_train: dict[int, bool]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_cub_metadata(root: str | Path) -> CUBMetadata:
    root = require_dir(root, "CUB root folder")
    relpaths = {img_id: rel for _, img_id, rel in _read_pairs(root / "images.txt")}
    classes = {cid: name for _, cid, name in _read_pairs(root / "classes.txt")}
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise UserError(f"{root / 'classes.txt'}: class ids must be 1..{len(classes)}")
    class_names = [classes[c] for c in sorted(classes)]
    n = len(classes)
    labels = {i: c - 1 for i, c in _read_int_column(root / "image_class_labels.txt", "class id", range(1, n + 1),
                                                     f"an integer in 1..{n}").items()}
    is_train = {i: v == 1 for i, v in _read_int_column(root / "train_test_split.txt", "split value", range(2),
                                                        "0 or 1: 1 = train, 0 = test").items()}
    ids = sorted(relpaths)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        missing = [i for i in ids if i not in table]
        if missing:
            raise UserError(f"{root / name}: no entry for image id {missing[0]} ({len(missing)} ids missing)")
    return CUBMetadata(root, ids, relpaths, labels, is_train, class_names)


def split_ids(meta: CUBMetadata, split: str, train_split: float = 1.0, split_seed: int = 0,
              empty_val_hint: str = " (pass --train_split < 1 to get a validation split)") -> list[int]:
    """Image ids of a split. `train_split` is the fraction of CUB's train images used for training;
    the rest, drawn with `split_seed` (stratified by class), is the validation split. An empty split is
    one UserError; for val it ends with `empty_val_hint`, the advice in the caller's own flags."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if not 0.0 < train_split <= 1.0:
        raise UserError(f"--train_split must be in (0, 1], got {train_split}")
    if split == "test":
        ids = [i for i in meta.ids if not meta.is_train[i]]
    else:
        train_ids = [i for i in meta.ids if meta.is_train[i]]
        rng = np.random.default_rng(split_seed)
        val: set[int] = set()
        if train_split < 1.0:
            by_class: dict[int, list[int]] = {}
            for i in train_ids:
                by_class.setdefault(meta.labels[i], []).append(i)
            for cls in sorted(by_class):
                members = by_class[cls]
                n_val = int(round(len(members) * (1.0 - train_split)))
                picked = rng.choice(len(members), size=n_val, replace=False) if n_val else []
                val.update(members[j] for j in picked)
        ids = [i for i in train_ids if (i in val) == (split == "val")]
    if not ids:
        hint = empty_val_hint if split == "val" else ""
        raise UserError(f"the {split} split of {meta.root} is empty{hint}")
    return ids


WATERBIRDS_COLUMNS = {"img_id": None, "y": range(2), "split": range(3), "place": range(2)}  # None: any integer
WATERBIRDS_TEST_SPLIT = 2  # metadata.csv's split column: 0 = train, 1 = val, 2 = test


class WaterbirdsRow(NamedTuple):
    """One row of a Waterbirds metadata.csv (`line`: its line number in the file)."""

    line: int
    img_id: int
    img_filename: str
    y: int
    place: int
    split: int


def read_waterbirds_rows(path: Path) -> list[WaterbirdsRow]:
    """The rows of a Waterbirds metadata.csv, in file order; a repeated file or id, or a value that is not
    an integer of its column's range, is one line naming file:line."""
    reader = csv.DictReader(io.StringIO(read_text(path, "Waterbirds metadata.csv"), newline=""))
    if reader.fieldnames is None or not {"img_filename", *WATERBIRDS_COLUMNS} <= set(reader.fieldnames):
        raise UserError(f"{path}: expected columns img_id,img_filename,y,split,place,place_filename")
    out, first_line = [], {}
    for row in reader:
        where = f"{path}:{reader.line_num}"
        values = {col: _csv_int(row[col], allowed, f"{where}: {col}") for col, allowed in WATERBIRDS_COLUMNS.items()}
        for key in (row["img_filename"], values["img_id"]):
            if key in first_line:
                raise UserError(f"{where}: {key!r} is already on line {first_line[key]} (expected each image once)")
            first_line[key] = reader.line_num
        out.append(WaterbirdsRow(reader.line_num, values["img_id"], row["img_filename"], values["y"],
                                 values["place"], values["split"]))
    return out


def read_waterbirds_metadata(path: Path) -> dict[str, tuple[int, int, int]]:
    """Map img_filename -> (y, place, split) from a Waterbirds metadata.csv (`read_waterbirds_rows`)."""
    return {r.img_filename: (r.y, r.place, r.split) for r in read_waterbirds_rows(path)}


def _csv_int(value: str | None, allowed: range | None, what: str) -> int:
    text = (value or "").strip()
    if not text.lstrip("-").isdigit() or (allowed is not None and int(text) not in allowed):
        want = f"one of {', '.join(map(str, allowed))}" if allowed is not None else "an integer"
        raise UserError(f"{what} is {value!r} (expected {want})")
    return int(text)


def check_waterbirds_split(meta_csv: Path, groups: dict, test_relpaths: list[str]) -> None:
    """The CUB test images evaluated on the Waterbirds folder must be exactly its own test split
    (split == 2), else evaluation would silently score Waterbirds' training birds."""
    ours = set(test_relpaths)
    theirs = {rel for rel, (_, _, split) in groups.items() if split == WATERBIRDS_TEST_SPLIT}
    disagree = sorted(ours ^ theirs)
    if disagree:
        rel = disagree[0]
        if rel in ours:
            why = f"a CUB test image, split {groups[rel][2]} there" if rel in groups else "a CUB test image, not there"
        else:
            why = "split 2 there, not a CUB test image (train_test_split.txt)"
        raise UserError(f"{meta_csv}: {len(disagree)} images disagree between CUB's test split and this file's "
                        f"split column (2 = test), e.g. {rel} ({why}); Waterbirds evaluation needs exactly its "
                        "test images")


def mask_relpath(relpath: str) -> str:
    return str(Path(relpath).with_suffix(".png"))


def load_rgb(path: Path) -> Image.Image:
    """The image upright, as 8-bit RGB (`bgmask.data.images`: the one decoding rule)."""
    return load_rgb_reduced(path, None)[0]


def load_rgb_reduced(path: Path, min_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb` and the image's full (w, h); with `min_side`, a large JPEG comes out reduced by 2, 4 or 8
    (see `bgmask.data.images.decode_rgb_reduced`)."""
    from bgmask.data.images import decode_rgb_reduced

    try:
        return decode_rgb_reduced(path, min_side)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: corrupt or not an image ({e.__class__.__name__})") from None


def load_mask(path: Path, size: tuple[int, int], threshold: int = 0,
              reduced: tuple[int, int] | None = None) -> np.ndarray:
    """Binary mask (H, W) uint8 in {0, 1}: 1 where the stored value > threshold. `size` is the upright
    image's full (width, height); the mask is decoded by the same rule (EXIF Orientation applied) and, when
    its image was decoded `reduced` to a smaller (w, h), reduced alike before the threshold."""
    from bgmask.data.images import decode_mask, reduce_mask

    try:
        mask = decode_mask(path)
        if mask.size != size:
            w, h = mask.size
            raise UserError(f"mask {path} is {w}x{h} but its image is {size[0]}x{size[1]} (expected the same size)")
        arr = np.asarray(reduce_mask(mask, reduced) if reduced else mask)
    except FileNotFoundError:
        raise UserError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read mask {path}: corrupt or not an image ({e.__class__.__name__})") from None
    return (arr > threshold).astype(np.uint8)


def item_record(ds, index: int, img_id: int, label: int, place: int, group: int) -> dict:
    """The record every dataset yields: image, label, index, img_id, place, group (-1: unknown) and, when
    `ds.masks` is set, mask; read from `ds.image_path` / `ds.mask_path` through `ds.transform`."""
    masks = ds.masks
    image, mask = load_item(ds.image_path(img_id), ds.mask_path(img_id) if masks is not None else None,
                            masks.threshold if masks is not None else 0, ds.transform)
    record = {"image": image, "label": label, "index": index, "img_id": img_id, "place": place, "group": group}
    if mask is not None:
        record["mask"] = mask
    return record


def load_item(image_path: Path, mask_path: Path | None, threshold: int, transform: Callable | None) -> tuple:
    """(image, mask or None) of one record: decoded (reduced when the transform asks for it, the mask
    alike) and passed through `transform`."""
    image, full = load_rgb_reduced(image_path, getattr(transform, "decode_min_side", None))
    mask = None if mask_path is None else load_mask(mask_path, full, threshold, image.size)
    if transform is not None:
        image, mask = transform(image, mask)
    return image, mask


def check_item_files(ds, listed: str) -> None:
    """Every image (and mask, when `ds.masks` is set) of a dataset's split exists, masks of their image's
    size: one line naming the first missing file and how many are missing (`listed`: where the item is
    listed, e.g. "listed in ROOT/images.txt")."""
    for what, path_of in (("image", ds.image_path), ("mask", ds.mask_path)):
        if what == "mask" and ds.masks is None:
            continue
        missing = [path_of(i) for i in ds.ids if not path_of(i).is_file()]
        if missing:
            raise UserError(f"{what} {listed} not found: {missing[0]} "
                            f"({len(missing)} of {len(ds.ids)} {ds.split} {what}s missing)")
    if ds.masks is not None:
        check_mask_sizes([(ds.image_path(i), ds.mask_path(i)) for i in ds.ids], ds.split)


def check_mask_sizes(pairs: list[tuple[Path, Path]], what: str, shown: int = 3) -> None:
    """Every mask has its (upright) image's size, read from the file headers only: a mismatch is found
    before training starts, not when the first epoch reaches it. `pairs`: (image, mask) paths; `what`
    names them in the message, e.g. "train"."""
    from bgmask.data.images import upright_size

    bad = []
    for image, mask in pairs:
        try:
            sizes = upright_size(image), upright_size(mask)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UserError(f"cannot read the header of {image} or {mask}: corrupt or not an image "
                            f"({e.__class__.__name__})") from None
        if sizes[0] != sizes[1]:
            bad.append(f"{mask} is {sizes[1][0]}x{sizes[1][1]}, its image {sizes[0][0]}x{sizes[0][1]}")
    if bad:
        raise UserError(f"{len(bad)} of {len(pairs)} {what} masks do not have their image's size: "
                        + "; ".join(bad[:shown]) + ("; ..." if len(bad) > shown else ""))


@dataclass
class MaskSource:
    """Where masks come from: 'gt' = ROOT/segmentations/<rel>.png (the same bird for the Waterbirds
    copy); any other value is a folder of predicted masks laid out as DIR/<image_subdir>/<rel>.png."""

    source: str = "gt"
    threshold: int = 0

    def path(self, root: Path, image_subdir: str, relpath: str) -> Path:
        if self.source == "gt":
            return root / "segmentations" / mask_relpath(relpath)
        return Path(self.source) / image_subdir / mask_relpath(relpath)

    def check(self, root: Path, image_subdir: str) -> None:
        if self.source == "gt":
            require_dir(root / "segmentations", "ground-truth mask folder")
        else:
            base = require_dir(self.source, "mask folder")
            require_dir(base / image_subdir, f"mask folder for '{image_subdir}' (DIR/<image_subdir>/<rel>.png)")


@dataclass
class CUBDataset(Dataset):
    """One split of CUB (or of a copy with the same ids, e.g. Waterbirds or masked images).

    transform: callable(image: PIL.Image, mask: np.ndarray | None) -> (image tensor, mask tensor | None),
    see `bgmask.data.transforms`.
    """

    root: str | Path
    split: str = "train"
    image_subdir: str = "images"
    train_split: float = 1.0
    split_seed: int = 0
    masks: MaskSource | None = None
    transform: Callable | None = None
    check_files: bool = True
    meta: CUBMetadata = field(init=False, repr=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.meta = read_cub_metadata(self.root)
        self.ids = split_ids(self.meta, self.split, self.train_split, self.split_seed)
        self.image_dir = require_dir(self.root / self.image_subdir, f"image folder '{self.image_subdir}'")
        if self.masks is not None:
            self.masks.check(self.root, self.image_subdir)
        self.groups: dict[str, tuple[int, int, int]] = {}
        meta_csv = self.image_dir / "metadata.csv"
        if meta_csv.is_file():
            self.groups = read_waterbirds_metadata(meta_csv)
            if self.split == "test":
                check_waterbirds_split(meta_csv, self.groups, [self.meta.relpaths[i] for i in self.ids])
        if self.check_files:
            check_item_files(self, f"listed in {self.root / 'images.txt'}")

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    def image_path(self, img_id: int) -> Path:
        return self.image_dir / self.meta.relpaths[img_id]

    def mask_path(self, img_id: int) -> Path:
        return self.masks.path(self.root, self.image_subdir, self.meta.relpaths[img_id])

    def labels(self) -> list[int]:
        return [self.meta.labels[i] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        img_id = self.ids[index]
        y, place, _ = self.groups.get(self.meta.relpaths[img_id], (-1, -1, -1))
        return item_record(self, index, img_id, self.meta.labels[img_id], place, y * 2 + place if place >= 0 else -1)
