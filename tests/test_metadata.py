"""Metadata files as a real download can have them wrong: a repeated id, an id with two labels, a byte
that is not UTF-8, a value out of its column's range, a Waterbirds split that is not CUB's test split.
Each is one UserError line naming file:line (or the file and an example) and what was expected."""

from __future__ import annotations

import pytest

from bgmask.data.cub import WATERBIRDS_SUBDIR, CUBDataset, read_cub_metadata
from bgmask.errors import UserError

WB = WATERBIRDS_SUBDIR


def _append(path, text: str | bytes):
    data = text if isinstance(text, bytes) else text.encode()
    path.write_bytes(path.read_bytes() + data)


def _one_line(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("name, extra, expected", [
    ("images.txt", "3 001.Class_1/again.jpg\n", "images.txt:19: id 3 is already on line 3 (expected each id once)"),
    ("image_class_labels.txt", "1 2\n", "image_class_labels.txt:19: id 1 is already on line 1"),  # two labels
    ("image_class_labels.txt", "1 1\n", "image_class_labels.txt:19: id 1 is already on line 1"),  # same label twice
    ("train_test_split.txt", "2 0\n", "train_test_split.txt:19: id 2 is already on line 2"),
    ("classes.txt", "2 002.Other\n", "classes.txt:4: id 2 is already on line 2"),
    ("classes.txt", b"4 004.Bad_\xff_name\n", "classes.txt:4: byte 0xff is not UTF-8"),
    ("images.txt", b"19 001.Class_1/\xe9t\xe9.jpg\n", "images.txt:19: byte 0xe9 is not UTF-8"),
])
def test_cub_metadata_file_line(tiny_cub, name, extra, expected):
    _append(tiny_cub / name, extra)
    message = _one_line(lambda: read_cub_metadata(tiny_cub))
    assert message.startswith(str(tiny_cub / name)) and expected in message


@pytest.mark.parametrize("name, line, expected", [
    ("image_class_labels.txt", "1 0", "image_class_labels.txt:1: class id '0' of image 1 out of range (expected an "
                                      "integer in 1..3)"),
    ("image_class_labels.txt", "1 1.5", "image_class_labels.txt:1: class id '1.5'"),
    ("train_test_split.txt", "1 2", "train_test_split.txt:1: split value '2' of image 1 out of range (expected 0 or 1"),
])
def test_cub_values_out_of_range(tiny_cub, name, line, expected):
    lines = (tiny_cub / name).read_text().splitlines()
    lines[0] = line
    (tiny_cub / name).write_text("\n".join(lines) + "\n")
    assert expected in _one_line(lambda: read_cub_metadata(tiny_cub))


def _edit_csv(root, row: int, column: str, value: str):
    """Set `column` of data row `row` (1 = the first after the header) in the Waterbirds metadata.csv."""
    path = root / WB / "metadata.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


def _waterbirds(root):
    return CUBDataset(root, "test", image_subdir=WB, check_files=False)


@pytest.mark.parametrize("column, value, expected", [
    ("place", "water", "metadata.csv:3: place is 'water' (expected one of 0, 1)"),
    ("place", "2", "metadata.csv:3: place is '2' (expected one of 0, 1)"),
    ("y", "", "metadata.csv:3: y is '' (expected one of 0, 1)"),
    ("split", "3", "metadata.csv:3: split is '3' (expected one of 0, 1, 2)"),
    ("img_id", "x1", "metadata.csv:3: img_id is 'x1' (expected an integer)"),
])
def test_waterbirds_values_out_of_range(tiny_cub, column, value, expected):
    _edit_csv(tiny_cub, 2, column, value)
    assert expected in _one_line(lambda: _waterbirds(tiny_cub))


def test_waterbirds_repeated_image_and_bad_bytes(tiny_cub):
    path = tiny_cub / WB / "metadata.csv"
    rows = path.read_text().splitlines()
    first = rows[1].split(",")
    _append(path, ",".join(["999", *first[1:]]) + "\n")  # the same file under another id
    assert f"metadata.csv:{len(rows) + 1}: {first[1]!r} is already on line 2" in _one_line(lambda: _waterbirds(tiny_cub))
    path.write_text("\n".join(rows) + "\n")
    _append(path, ",".join([first[0], "other.jpg", *first[2:]]) + "\n")  # the same id for another file
    assert f"metadata.csv:{len(rows) + 1}: {int(first[0])} is already on line 2" in _one_line(
        lambda: _waterbirds(tiny_cub))
    path.write_text("\n".join(rows) + "\n")
    _append(path, b"7,a\xff.jpg,0,2,0,/x\n")
    assert f"metadata.csv:{len(rows) + 1}: byte 0xff is not UTF-8" in _one_line(lambda: _waterbirds(tiny_cub))


def test_waterbirds_split_agrees_with_cub_test(tiny_cub):
    ds = _waterbirds(tiny_cub)
    assert len(ds) == 6 and {r for r in ds.groups.values()} <= {(y, p, 2) for y in (0, 1) for p in (0, 1)}


def test_cub_test_image_that_waterbirds_trains_on(tiny_cub):
    rel = _edit_csv(tiny_cub, 1, "split", "0").read_text().splitlines()[1].split(",")[1]
    message = _one_line(lambda: _waterbirds(tiny_cub))
    assert "1 images disagree" in message and f"{rel} (a CUB test image, split 0 there)" in message


def test_waterbirds_test_image_that_cub_trains_on(tiny_cub):
    meta = read_cub_metadata(tiny_cub)
    train_rel = meta.relpaths[next(i for i in meta.ids if meta.is_train[i])]
    _edit_csv(tiny_cub, 1, "split", "0")
    _append(tiny_cub / WB / "metadata.csv", f"1000,{train_rel},0,2,0,/x/1000.jpg\n")
    message = _one_line(lambda: _waterbirds(tiny_cub))
    assert "2 images disagree" in message and "split column (2 = test)" in message


def test_cub_test_image_missing_from_waterbirds(tiny_cub):
    path = tiny_cub / WB / "metadata.csv"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[:-1]) + "\n")
    rel = rows[-1].split(",")[1]
    assert f"e.g. {rel} (a CUB test image, not there)" in _one_line(lambda: _waterbirds(tiny_cub))


def test_training_split_on_the_waterbirds_folder_is_not_checked(tiny_cub):
    _edit_csv(tiny_cub, 1, "split", "0")
    CUBDataset(tiny_cub, "train", image_subdir=WB, check_files=False)  # only the evaluated test ids are compared
