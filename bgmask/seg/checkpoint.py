"""Slim inference checkpoints of a segmenter, and the one explicit way to unpickle a full one.

A slim checkpoint holds only plain data, so `torch.load(weights_only=True)` reads it:

    {"meta": {"format": "bgmask-seg-slim-v1", "dataset_meta": {"classes": [...], "palette": [...]},
              "config": <the resolved MMSeg config, Python text>, "iter": int, ...},
     "state_dict": {name: tensor}}

It keeps mmengine's layout (`state_dict` + `meta.dataset_meta`), so MMSeg's own
`mmseg.apis.init_model(config, path)` also loads it.

A full mmengine checkpoint (`iter_N.pth`, optimizer, message hub with pickled `HistoryBuffer`s)
needs `weights_only=False`, i.e. it can run arbitrary code while loading: that is allowed only for
our own runs and only when asked for (`trust_full=True`, `--trust-full-checkpoint`, `--resume`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path

import torch

from bgmask.errors import UserError, require_file
from bgmask.io import atomic_path, read_torch_file

SLIM_FORMAT = "bgmask-seg-slim-v1"


def _plain(obj):
    """Only types the weights_only unpickler accepts (no numpy scalars, no custom classes)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy array
        return obj.tolist()
    return str(obj)


def save_slim(path: str | Path, state_dict: dict, dataset_meta: dict | None, config_text: str,
              **meta) -> Path:
    """Write a slim checkpoint atomically."""
    path = Path(path)
    ckpt = {
        "meta": _plain({"format": SLIM_FORMAT, "dataset_meta": dataset_meta or {}, "config": config_text, **meta}),
        "state_dict": OrderedDict((k, v.detach().cpu().clone()) for k, v in state_dict.items()),
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint_file(path: str | Path, trust_full: bool = False, map_location="cpu",
                         trust_flag: str = "--trust-full-checkpoint") -> dict:
    """Load a slim checkpoint (`weights_only=True`), or a full mmengine one when `trust_full`; the
    refusal of a full one names `trust_flag`, the calling command's flag (the classifier scripts':
    --trust_checkpoint). `bgmask.io.read_torch_file` with the segmenter's lines: junk, which no flag can
    load, is never told to trust anything."""
    path = require_file(path, "segmenter checkpoint")
    unsafe = (f"{path} is a full mmengine checkpoint (it pickles Python objects, so loading it can run "
              "code); use the slim WORK_DIR/segmenter_slim.pth that train.py writes, or pass "
              f"{trust_flag} if this file comes from your own training run")
    return read_torch_file(path, "checkpoint", trust_full, map_location, trust_flag=trust_flag, unsafe=unsafe,
                           explain=True)


def state_dict_and_meta(ckpt: dict, source: str | Path = "checkpoint") -> tuple[dict, dict]:
    """(state_dict, meta) of a slim or full mmengine checkpoint, or of a bare state dict."""
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return ckpt["state_dict"], dict(ckpt.get("meta") or {})
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, {}
    what = "a bgmask classifier checkpoint, not a segmenter" if isinstance(ckpt, dict) and \
        ckpt.get("format") == "bgmask-classifier" else "no 'state_dict'"
    raise UserError(f"{source} holds {what} (expected a slim or mmengine segmenter checkpoint)")


def convert_to_slim(src: str | Path, dst: str | Path, trust_full: bool = False, config_text: str | None = None) -> Path:
    """Slim copy of a checkpoint (e.g. WORK_DIR/iter_16000.pth of our own run, with trust_full=True)."""
    state_dict, meta = state_dict_and_meta(load_checkpoint_file(src, trust_full=trust_full), src)
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if config_text is None:
        config_text = meta.get("cfg") or meta.get("config") or ""
    extra = {k: meta[k] for k in ("iter", "epoch", "mmseg_version", "seed") if k in meta}
    return save_slim(dst, state_dict, meta.get("dataset_meta"), config_text, source=str(src), **extra)


@contextlib.contextmanager
def trusted_full_checkpoints(folder: str | Path):
    """Inside the block, mmengine may unpickle full checkpoints (weights_only=False) found under
    `folder` (the work dir of our own run, to resume it); anything else still loads weights-only.
    mmengine's loader of local paths (scheme "") is swapped through its public `register_scheme`, and
    its own `load_from_local` is put back afterwards."""
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_local

    folder = Path(folder).resolve()

    def load_local(filename, map_location=None):
        path = Path(filename).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{filename} can not be found.")
        trusted = folder == path or folder in path.parents
        return torch.load(path, map_location=map_location, weights_only=not trusted)

    CheckpointLoader.register_scheme("", load_local, force=True)
    try:
        yield
    finally:
        CheckpointLoader.register_scheme("", load_from_local, force=True)
