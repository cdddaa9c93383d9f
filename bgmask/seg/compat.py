"""Run MMSegmentation on mmcv-lite (no compiled ops): a stand-in `mmcv._ext` module.

Some mmseg/mmdet modules import `mmcv.ops` unconditionally, and `mmcv.ops` loads its compiled
extension `mmcv._ext` at import time; mmcv-lite does not ship it. `install()` registers a stand-in
module before mmseg is imported, so every pure-PyTorch path (SegFormer, FCN, Mask2Former Swin-T) works.
Any compiled op that is actually called raises `MissingCompiledOp` naming the op. On CUDA,
`MultiScaleDeformableAttention` would call the compiled kernel, so its PyTorch path is forced.

Importing this module (also done by `import bgmask.seg`) only registers the stand-in in `sys.modules`,
without importing mmcv, so that MMSeg may be imported afterwards in any order; `install()` (called by
every bgmask.seg entry point and by `bgmask.seg.dataset`, which configs import) also forces the PyTorch
path. Both are idempotent and do nothing when the real compiled `mmcv._ext` (full mmcv) is present.

`use_test_split` is the one place where bgmask sets private state of an mmengine object (mmengine has no
public way to point a runner's test loop at another dataloader). `build_runner` gives every run its own
process-wide visualizer and logger.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import time
import types
import uuid
from pathlib import Path

from bgmask.errors import UserError

EXT_NAME = "mmcv._ext"
_ORIGIN = "bgmask.seg.compat (stand-in for mmcv-lite)"


class MissingCompiledOp(UserError):
    """A config needs a compiled mmcv op, which mmcv-lite lacks."""


class _StandInExt(types.ModuleType):
    """Every public attribute is a function that raises `MissingCompiledOp` when called.

    `mmcv.utils.ext_loader.load_ext` only checks `hasattr(ext, name)` at import time; the error
    comes when (and only if) a model calls the op."""

    is_bgmask_stand_in = True

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing_op(*args, **kwargs):
            raise MissingCompiledOp(
                f"the model called the compiled mmcv op '{name}', which mmcv-lite does not have; "
                "use a config whose layers run in pure PyTorch (SegFormer, FCN, Mask2Former) "
                "or install full mmcv with its compiled ops"
            )

        missing_op.__name__ = name
        missing_op.__qualname__ = f"_ext.{name}"
        return missing_op


def has_real_ext() -> bool:
    """True when the compiled extension of full mmcv is present (checked without importing mmcv)."""
    mod = sys.modules.get(EXT_NAME)
    if mod is not None:
        return not getattr(mod, "is_bgmask_stand_in", False)
    spec = importlib.util.find_spec("mmcv")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(any(Path(loc).glob("_ext.*")) for loc in spec.submodule_search_locations)


def register_stub() -> bool:
    """Put the stand-in `mmcv._ext` into sys.modules (no mmcv import). True when it is in use."""
    if has_real_ext():
        return False
    if EXT_NAME not in sys.modules:
        mod = _StandInExt(EXT_NAME, __doc__)
        # A real spec: mmengine's environment report calls pkgutil.find_loader('mmcv._ext'), which
        # fails on a module whose __spec__ is None. loader=None reports "no compiled ops".
        mod.__spec__ = importlib.machinery.ModuleSpec(EXT_NAME, loader=None, origin=_ORIGIN)
        mod.__file__ = _ORIGIN
        sys.modules[EXT_NAME] = mod
    return True


def install() -> bool:
    """register_stub(), then force the PyTorch path of MultiScaleDeformableAttention (this imports
    mmcv.ops). Returns True when the stand-in is in use."""
    if not register_stub():
        return False
    import mmcv
    import mmcv.ops.multi_scale_deform_attn as msda

    mmcv._ext = sys.modules[EXT_NAME]
    # `MultiScaleDeformableAttention.forward` picks the compiled kernel when CUDA is available and the
    # tensor is on CUDA; with these flags off it takes `multi_scale_deformable_attn_pytorch`.
    msda.IS_CUDA_AVAILABLE = False
    msda.IS_MLU_AVAILABLE = False
    return True


def build_runner(cfg):
    """`Runner.from_cfg(cfg)` with this run's own visualizer and logger.

    mmengine keeps both as process-wide instances found by name, and `get_instance` hands back an
    existing one unchanged: the configs name the visualizer 'visualizer', and the logger is named
    `<config>_<timestamp>` (to the second). A second run in the same process (the demo, the sweep, a
    notebook) would write its config, scalars or log into the first run's folder. A per-run tag in both
    names (a name a config sets itself is kept, tagged) gives each run its own."""
    from mmengine.runner import Runner

    tag = uuid.uuid4().hex[:8]
    if not cfg.get("experiment_name"):  # mmengine's own form, tagged
        stem = Path(cfg.filename).stem if cfg.filename else "config"
        cfg.experiment_name = f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}_{tag}"
    visualizer = cfg.get("visualizer")
    if isinstance(visualizer, dict):
        visualizer["name"] = f"{visualizer.get('name') or 'visualizer'}_{tag}"
    return Runner.from_cfg(cfg)


def use_test_split(runner, dataloader, evaluator, loop) -> None:
    """Make the next `runner.test()` run `loop` (a test loop config) over `dataloader` with `evaluator`,
    keeping the runner's model, log and hooks (one runner tests every split).

    Needed because mmengine builds a runner's test loop from the dataloader, evaluator and loop settings
    given to `Runner.__init__` and offers no public way to change them: `Runner.test_loop` has no setter,
    and the hooks and the log processor read `runner.test_loop` / `runner.test_dataloader`, so a loop
    built and run on the side would log the wrong split. `Runner.test()` rebuilds the loop from these
    three private attributes. Checked against mmengine 0.10.7 (`Runner.__init__` stores
    `_test_dataloader`, `_test_evaluator`, `_test_loop`; `Runner.test()` calls
    `self.build_test_loop(self._test_loop)`)."""
    runner._test_dataloader = dataloader
    runner._test_evaluator = evaluator
    runner._test_loop = loop


register_stub()
