"""The model zoo: the shipped files (sha256, loading through `--pretrained_file zoo:NAME`), its one-line
errors, and `bgmask pretrain` end to end on a tiny setting."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from bgmask import args as A
from bgmask.apps.cli import main as cli_main
from bgmask.errors import UserError
from bgmask.io import file_sha256
from bgmask.models import HEADS, create_classifier, weights

SHIPPED = weights.read_zoo_index()
# every shipped file, a ViT's with every registered head
NAME_HEADS = [(n, h) for n, e in sorted(SHIPPED.items()) for h in (HEADS if "vit" in e["model_arch"] else [None])]
TINY = ["pretrain", "--model", "cnn", "--num_classes", "3", "--train_per_class", "10", "--test_per_class", "2",
        "--epochs", "1", "--batch_size", "8", "--max_steps_per_epoch", "2", "--num_workers", "0", "--threads", "1"]


def test_the_zoo_ships_a_cnn_and_a_vit():
    assert {"cnn": "bgmask_resnet_tiny", "vit": "bgmask_vit_tiny"}.items() <= \
        {n: e["model_arch"] for n, e in SHIPPED.items()}.items()
    index = json.loads((weights.ZOO_DIR / weights.ZOO_INDEX).read_text())
    assert (index["format"], index["version"]) == ("bgmask-zoo", 1)
    assert sum(e["bytes"] for e in SHIPPED.values()) < 8_000_000  # a few MB in all


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_matches_its_record(name):
    entry = SHIPPED[name]
    path = weights.ZOO_DIR / entry["file"]
    assert entry["file"] == f"{name}.safetensors"
    assert file_sha256(path) == entry["sha256"]
    assert path.stat().st_size == entry["bytes"]
    assert entry["command"].startswith("bgmask pretrain --model ") and f"--name {name} " in entry["command"]
    assert entry["data"]["correlation"] == 0.95 and entry["data"]["seed"] != 0  # habitat context; not the demo's species
    assert entry["chosen"] in [c["recipe"]["name"] for c in entry["candidates"]]
    assert entry["val_acc"] == max(c["val_acc"] for c in entry["candidates"])


@pytest.mark.parametrize("name,head", NAME_HEADS)
def test_shipped_file_loads_every_backbone_tensor(name, head):
    """Through create_classifier(pretrained_file="zoo:NAME"), the path train.py's flag takes."""
    arch = SHIPPED[name]["model_arch"]
    clf = create_classifier(arch, 10, image_size=64, pretrained_file=f"zoo:{name}", head=head)
    stored = safetensors.torch.load_file(str(weights.ZOO_DIR / SHIPPED[name]["file"]))
    head_keys = set(clf.head_state_keys())
    model = {k.removeprefix("backbone."): v for k, v in clf.state_dict().items() if k not in head_keys}
    assert sorted(stored) == sorted(model)
    for k, v in stored.items():
        assert torch.equal(model[k], v.to(model[k].dtype)), k
        fp16 = SHIPPED[name]["dtype"] == "fp16" and v.is_floating_point()
        assert v.dtype == (torch.float16 if fp16 else model[k].dtype)


def test_unknown_name_lists_the_zoo():
    names = ", ".join(f"zoo:{n}" for n in sorted(SHIPPED))
    with pytest.raises(UserError) as e:
        create_classifier("bgmask_resnet_tiny", 10, pretrained_file="zoo:unknown")
    assert str(e.value) == (f"unknown zoo model 'zoo:unknown'; the zoo ({weights.ZOO_DIR / 'zoo.json'}) has {names}")


def test_name_of_another_architecture_is_one_line():
    with pytest.raises(UserError, match=r"^zoo:cnn holds bgmask_resnet_tiny weights, not bgmask_vit_tiny "
                                        r"\(pass --model_arch bgmask_resnet_tiny\)$"):
        create_classifier("bgmask_vit_tiny", 10, pretrained_file="zoo:cnn")


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A copy of the shipped zoo, in place of it."""
    copy = tmp_path / "zoo"
    shutil.copytree(weights.ZOO_DIR, copy)
    monkeypatch.setattr(weights, "ZOO_DIR", copy)
    return copy


def test_tampered_copy_names_the_file_and_both_hashes(zoo_copy):
    path = zoo_copy / "cnn.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # a weight's last byte: still a readable file
    path.write_bytes(bytes(data))
    actual, recorded = file_sha256(path), SHIPPED["cnn"]["sha256"]
    with pytest.raises(UserError) as e:
        create_classifier("bgmask_resnet_tiny", 10, pretrained_file="zoo:cnn")
    assert str(e.value) == (f"zoo:cnn: {path} has sha256 {actual}, zoo.json records {recorded} (a changed or damaged "
                            f"file: restore it, or remake it with {SHIPPED['cnn']['command']})")


def test_missing_file_and_broken_index_are_one_line(zoo_copy):
    (zoo_copy / "cnn.safetensors").unlink()
    with pytest.raises(UserError, match=rf"^zoo:cnn: {zoo_copy}/cnn.safetensors is missing \(remade by: bgmask "):
        create_classifier("bgmask_resnet_tiny", 10, pretrained_file="zoo:cnn")
    for text in ("{not json", '{"models": {"cnn": {"file": "cnn.safetensors"}}}', "[]"):
        (zoo_copy / "zoo.json").write_text(text)
        with pytest.raises(UserError, match=rf"^{zoo_copy}/zoo.json: not a zoo index \(expected JSON"):
            create_classifier("bgmask_resnet_tiny", 10, pretrained_file="zoo:cnn")


def test_plain_paths_are_untouched(tmp_path):
    with pytest.raises(UserError, match=r"^pretrained_file not found: /nonexistent/w.pth \(expected"):
        create_classifier("bgmask_resnet_tiny", 10, pretrained_file="/nonexistent/w.pth")
    (tmp_path / "w.pth").write_bytes(b"")
    assert weights.resolve_pretrained_file(tmp_path / "w.pth") == str(tmp_path / "w.pth")  # read as before


@pytest.mark.parametrize("argv,message", [
    (["--recipes", "lr9"], "--recipes lr9: the bgmask_resnet_tiny recipes are lr2e-3, lr4e-3, lr4e-3_affine"),
    (["--model", "vit", "--recipes", "lr2e-3"], "--recipes lr2e-3: the bgmask_vit_tiny recipes are lr1e-3_clip1, "
                                                "lr2e-3_clip1"),
    (["--data_seed", "0"], "--data_seed must be >= 1, got 0"),
    (["--val_fraction", "0.01"], "--val_fraction 0.01 of --train_per_class 10 leaves no val image per species "
                                 "(raise either)"),
    (["--name", "a/b"], "--name 'a/b': expected letters, digits, '_' or '-' (it names NAME.safetensors)"),
])
def test_pretrain_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert cli_main(TINY + ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_pretrain_tiny_writes_a_loadable_entry_and_reproduces_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = {"file": "other.safetensors", "sha256": "0" * 64, "model_arch": "bgmask_vit_tiny"}
    (out / "zoo.json").write_text(json.dumps({"format": "bgmask-zoo", "version": 1, "models": {"other": other}}))
    argv = TINY + ["--recipes", "lr2e-3", "lr4e-3", "--name", "tiny", "--out", str(out),
                   "--work", str(tmp_path / "w")]
    assert cli_main(argv) == 0
    index = weights.read_zoo_index(out)
    assert sorted(index) == ["other", "tiny"] and index["other"] == other  # the other entry kept
    e = index["tiny"]
    assert e["command"] == ("bgmask pretrain --model cnn --name tiny --recipes lr2e-3 lr4e-3 --epochs 1 "
                            "--masked_warmup_epochs 0 --num_classes 3 --correlation 0.95 --train_per_class 10 --test_per_class 2 "
                            "--data_seed 1000 --image_size 64 --val_fraction 0.1 --batch_size 8 --seed 0 --dtype auto "
                            "--threads 1 --num_workers 0 --max_steps_per_epoch 2")
    assert e["masked_warmup"] is None
    assert [c["recipe"]["name"] for c in e["candidates"]] == ["lr2e-3", "lr4e-3"]
    assert all(len(c["val_acc_per_epoch"]) == 1 for c in e["candidates"])
    assert e["data"] == {"generator": "bgmask.data.synthetic.generate_synthetic", "num_classes": 3,
                         "image_size": 64, "train_per_class": 10, "test_per_class": 2, "correlation": 0.95,
                         "seed": 1000, "val_fraction": 0.1, "split_seed": 0}
    path = out / "tiny.safetensors"
    assert (e["sha256"], e["bytes"], e["model_arch"]) == (file_sha256(path), path.stat().st_size,
                                                          "bgmask_resnet_tiny")
    monkeypatch.setattr(weights, "ZOO_DIR", out)
    clf = create_classifier("bgmask_resnet_tiny", 3, pretrained_file="zoo:tiny")
    stored = safetensors.torch.load_file(str(path))
    assert torch.equal(clf.state_dict()["backbone.conv1.weight"], stored["conv1.weight"].float())
    # train.py's flag: one fine-tuning step from zoo:tiny on the pretraining data itself
    data = tmp_path / "w" / "data" / "synbirds_3sp_s1000_64px_10+2_c0.95"
    cfg = A.parse_with_config(A.train_parser("t"), [
        "--data_path", str(data), "--model_arch", "bgmask_resnet_tiny", "--pretrained_file", "zoo:tiny",
        "--epochs", "1", "--batch_size", "8", "--image_size", "64", "--max_steps_per_epoch", "1", "--num_workers", "0",
        "--no_progress", "--snapshot_dir", str(tmp_path / "ft"), "--augmentations_to_use", "none"])
    from bgmask.engine import run

    assert 0 <= run(cfg)["test/acc"] <= 1
    # the recorded command, run again elsewhere, makes the same file
    assert cli_main(argv[:-4] + ["--out", str(tmp_path / "again"), "--work", str(tmp_path / "w2")]) == 0
    assert file_sha256(tmp_path / "again" / "tiny.safetensors") == e["sha256"]
