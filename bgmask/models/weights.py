"""Building timm backbones and loading weights: pretrained (local cache first, no network stalls) or from
a checkpoint file (`--pretrained_file`).

`load_pretrained_file` accepts
  - a `.safetensors` file, or a `.pth`/`.pt`/`.bin` file readable with `torch.load(weights_only=True)`;
  - a raw state dict or one under the key `model`, `state_dict` or `model_state`;
  - timm-format keys (any timm checkpoint of the architecture, also the original DINOv2 / FB ConvNeXt
    formats, converted by timm's checkpoint filter), our own `Classifier.state_dict()` (keys `backbone.*`,
    `head.*`), and either with a DistributedDataParallel `module.` prefix;
  - for ViTs, any grid size: the position embedding is resampled to the model's grid;
  - `zoo:NAME`: a backbone of the model zoo shipped in bgmask/zoo_weights/ (made by `bgmask pretrain`,
    listed in its zoo.json), its sha256 checked against zoo.json on every load.
Classifier-head tensors whose shape does not fit (another class count) are dropped and stay freshly
initialised; a file whose backbone tensors mostly do not fit is rejected with a UserError.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import sys
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from bgmask.io import file_sha256, load_weights_only
from bgmask.errors import UserError

_logger = logging.getLogger(__name__)

ZOO_PREFIX = "zoo:"
ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo_weights"  # package data (pyproject)
ZOO_INDEX = "zoo.json"
HUB_TIMEOUT_S = 3.0
STATE_DICT_KEYS = ("model", "state_dict", "model_state")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


# ----------------------------------------------------------------------------------------------------------
# architecture names and pretrained weights


def check_model_arch(model_arch: str) -> None:
    """UserError for a name timm does not know, with up to 5 close matches."""
    if timm.is_model(model_arch):
        try:
            timm.models.get_pretrained_cfg(model_arch)
        except RuntimeError as e:  # "Invalid pretrained tag (x) for arch"
            tags = timm.list_pretrained(model_arch.split(".")[0] + ".*")
            raise UserError(f"unknown pretrained tag in model_arch={model_arch!r} ({e}); "
                            f"known: {', '.join(tags) or 'none'}") from e
        return
    arch = model_arch.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"unknown model_arch {model_arch!r} (expected a timm model name){hint}")


def hub_problem(model_arch: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the pretrained weights of `model_arch` cannot be downloaded now, or None when they can. The
    question goes to the same client and settings that the download uses: huggingface_hub for Hub-hosted
    weights (HF_ENDPOINT mirrors, HTTPS_PROXY, HF_HUB_OFFLINE, its token), urllib with the environment's
    proxies for other URLs; one request without retries, so an offline machine answers at once."""
    cfg = timm.models.get_pretrained_cfg(model_arch)
    if cfg is not None and cfg.hf_hub_id:
        import huggingface_hub
        from timm.models._hub import hf_split

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set and they are not in the local cache"
        repo_id, revision = hf_split(cfg.hf_hub_id)
        try:
            huggingface_hub.model_info(repo_id, revision=revision, timeout=timeout)
        except Exception as e:  # any client error means: no download now
            return f"{huggingface_hub.constants.ENDPOINT} answered {type(e).__name__}: {_one_line(e)}"
        return None
    if cfg is not None and cfg.url:
        from urllib.request import Request, urlopen

        try:
            urlopen(Request(cfg.url, method="HEAD"), timeout=timeout).close()
        except Exception as e:
            return f"{urlparse(cfg.url).hostname} answered {type(e).__name__}: {_one_line(e)}"
    return None


def cached_pretrained_file(model_arch: str) -> str | None:
    """Path of the pretrained weights of `model_arch` when they are already in the local Hugging Face or
    torch.hub cache (so loading needs no network), else None."""
    cfg = timm.models.get_pretrained_cfg(model_arch)
    if cfg is None:
        return None
    if cfg.file and os.path.isfile(cfg.file):
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from timm.models._hub import hf_split

        repo_id, revision = hf_split(cfg.hf_hub_id)
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            path = try_to_load_from_cache(repo_id, name, revision=revision)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(path):
            return path
    return None


def create_timm_model(model_arch: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model` with clear errors. pretrained=True loads cached weights without touching the
    network; otherwise it asks the hub once (`hub_problem`) before downloading."""
    check_model_arch(model_arch)
    try:
        if not pretrained:
            return timm.create_model(model_arch, pretrained=False, **kwargs)
        cfg = timm.models.get_pretrained_cfg(model_arch)
        if cfg is None or not cfg.has_weights:
            raise UserError(f"no pretrained weights are published for model_arch={model_arch}; "
                            "pass --pretrained_file PATH (a .pth/.safetensors state dict) or train from scratch")
        cached = cached_pretrained_file(model_arch)
        if cached is not None:
            _logger.info("loading pretrained %s from the local cache: %s", model_arch, cached)
            return timm.create_model(model_arch, pretrained=True, pretrained_cfg_overlay=dict(file=cached), **kwargs)
        problem = hub_problem(model_arch)
        if problem is not None:
            raise UserError(f"cannot download pretrained weights for {model_arch}: {problem}; "
                            "pass --pretrained_file PATH (a .pth/.safetensors state dict)")
        try:
            return timm.create_model(model_arch, pretrained=True, **kwargs)
        except OSError as e:
            raise UserError(f"cannot download pretrained weights for {model_arch}: {e}; "
                            "pass --pretrained_file PATH (a .pth/.safetensors state dict)") from e
    except RuntimeError as e:  # e.g. timm's "Invalid pretrained tag (x) for arch"
        raise UserError(f"cannot create model_arch={model_arch}: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# the model zoo (`--pretrained_file zoo:NAME`; bgmask.apps.zoo writes it)


def read_zoo_index(zoo_dir: str | Path | None = None) -> dict[str, dict]:
    """name -> entry of ZOO_DIR/zoo.json (`{"models": {NAME: {"file", "sha256", "model_arch", ...}}}`);
    {} when there is no index yet."""
    path = Path(zoo_dir or ZOO_DIR) / ZOO_INDEX
    if not path.is_file():
        return {}
    try:
        models = json.loads(path.read_text(encoding="utf-8")).get("models")
    except (ValueError, UnicodeDecodeError, AttributeError):
        models = None
    keys = ("file", "sha256", "model_arch")
    if not isinstance(models, dict) or not all(  # a file name, not a path that could leave the zoo folder
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in keys) and Path(e["file"]).name == e["file"]
            for e in models.values()):
        raise UserError(f"{path}: not a zoo index (expected JSON {{\"models\": {{NAME: {{{', '.join(keys)}, ...}}}}}})")
    return models


def resolve_pretrained_file(spec: str | Path, model_arch: str | None = None) -> str:
    """The file a `--pretrained_file` value names: `zoo:NAME` -> the zoo's file, after checking that it
    holds `model_arch` weights and that its sha256 is the one zoo.json records; anything else is a path
    that must exist."""
    spec = str(spec)
    if not spec.startswith(ZOO_PREFIX):
        if not os.path.isfile(spec):
            raise UserError(f"pretrained_file not found: {spec} (expected a .pth/.safetensors state dict or zoo:NAME)")
        return spec
    name, zoo = spec[len(ZOO_PREFIX):], read_zoo_index()
    if name not in zoo:
        raise UserError(f"unknown zoo model {spec!r}; the zoo ({ZOO_DIR / ZOO_INDEX}) has "
                        f"{', '.join(ZOO_PREFIX + n for n in sorted(zoo)) or 'no models'}")
    entry = zoo[name]
    path = ZOO_DIR / entry["file"]
    if model_arch is not None and model_arch.split(".")[0] != entry["model_arch"]:
        raise UserError(f"{spec} holds {entry['model_arch']} weights, not {model_arch} (pass --model_arch "
                        f"{entry['model_arch']})")
    if not path.is_file():
        raise UserError(f"{spec}: {path} is missing (remade by: {entry.get('command', 'bgmask pretrain')})")
    actual = file_sha256(path)
    if actual != entry["sha256"]:
        raise UserError(f"{spec}: {path} has sha256 {actual}, zoo.json records {entry['sha256']} (a changed or "
                        f"damaged file: restore it, or remake it with {entry.get('command', 'bgmask pretrain')})")
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# checkpoint files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: a raw state dict or one under `model` / `state_dict` / `model_state`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained_file not found: {path} (expected a .pth/.safetensors state dict)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors.torch

        try:
            raw = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise UserError(f"cannot read {path} as a .safetensors file: {_one_line(e)}") from e
    elif suffix in TORCH_SUFFIXES:
        try:
            raw = load_weights_only(path)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):  # a corrupt file, not a pickled Python object
                raise UserError(f"cannot read {path} as a PyTorch checkpoint (corrupt, or not written by "
                                "torch.save); expected a .pth/.safetensors state dict") from e
            why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
            why = why.replace("WeightsUnpickler error: ", "").split(" was not an allowed global")[0]
            raise UserError(
                f"{path} needs arbitrary unpickling ({why or 'it holds Python objects besides tensors'}); refusing "
                "to run code from a checkpoint: save a plain state dict "
                "(torch.save(model.state_dict()) or .safetensors)"
            ) from e
        except Exception as e:
            raise UserError(f"cannot read {path} as a PyTorch checkpoint: {_one_line(e)}") from e
    else:
        raise UserError(f"pretrained_file {path} has an unknown suffix {suffix!r} "
                        f"(expected .safetensors or one of {', '.join(TORCH_SUFFIXES)})")
    return _unwrap(raw, path)


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0].split(". ")[0][:200] if lines else type(e).__name__


def _unwrap(raw, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(raw, dict):
            break
        tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(raw) / 2:
            return tensors
        nested = next((raw[k] for k in STATE_DICT_KEYS if isinstance(raw.get(k), dict)), None)
        if nested is None:
            break
        raw = nested
    found = ", ".join(map(str, list(raw)[:8])) if isinstance(raw, dict) else type(raw).__name__
    raise UserError(f"no state dict found in {path} (expected tensors at the top level or under "
                    f"{'/'.join(STATE_DICT_KEYS)}; found {found})")


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove `prefix` from the keys that have it; the others are kept as they are."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _timm_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the model family's timm checkpoint filter (format conversion, ViT pos_embed resampling)."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return sd
    try:
        return filter_fn(dict(sd), model)
    except Exception as e:  # a foreign checkpoint the filter cannot convert: it just will not match
        _logger.debug("checkpoint filter of %s failed: %s", type(model).__name__, e)
        return sd


def load_pretrained_file(classifier, path: str | Path) -> None:
    """Load a checkpoint file or `zoo:NAME` into a `Classifier` (see the module docstring for what is
    accepted)."""
    path = Path(resolve_pretrained_file(path, classifier.model_arch))
    sd = _strip(read_state_dict(path), "module.")
    target = classifier.state_dict()
    head_keys = set(classifier.head_state_keys())
    backbone_keys = [k for k in target if k not in head_keys]
    backbone = classifier.backbone

    def timm_space(d):  # timm keys -> our keys
        return {f"backbone.{k}": v for k, v in _timm_filter(d, backbone).items()}

    ours = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    candidates = [timm_space(sd)]  # a timm / foreign checkpoint of the backbone
    if ours:  # our own Classifier (or a "backbone."-prefixed checkpoint): head tensors keep their names
        candidates.append({**{k: v for k, v in sd.items() if k in head_keys},
                           **timm_space({k[len("backbone."):]: v for k, v in ours.items()})})

    def fits(cand, k):
        return k in cand and tuple(cand[k].shape) == tuple(target[k].shape)

    best = max(candidates, key=lambda cand: sum(fits(cand, k) for k in backbone_keys))
    n = sum(fits(best, k) for k in backbone_keys)
    m = len(backbone_keys)
    if 2 * n < m:
        raise UserError(f"{path} does not look like a {classifier.model_arch} checkpoint ({n} of {m} tensors match)")
    load = {k: best[k] for k in target if fits(best, k)}
    dropped_head = sorted(k for k in head_keys if k in best and k not in load)
    if dropped_head:
        _logger.info("%s: classifier head re-initialised (shape mismatch: %s)", path, ", ".join(dropped_head))
    missing = [k for k in backbone_keys if k not in load]
    if missing:
        _logger.warning("%s: %d of %d backbone tensors not in the file, left initialised (e.g. %s)",
                        path, len(missing), m, ", ".join(missing[:3]))
    classifier.load_state_dict(load, strict=False)
    _logger.info("loaded %d tensors from %s", len(load), path)
