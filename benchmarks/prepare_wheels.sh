#!/usr/bin/env bash
# Prepares .whl/: the wheels an offline GPU image (Python 3.12, its own torch / torchvision / timm /
# numpy / scipy / opencv-python-headless / rich / regex / six) lacks for the whole GPU check: captum (the
# final attribution) and the MMSeg stack (Mask2Former, the online segmenter), each with the missing
# packages its Requires-Dist names. Run it where pip reaches the registry, before
# `bash benchmarks/gpu_check.sh OUT`, which installs them there with `pip install --no-index --no-deps`.
#
#   bash benchmarks/prepare_wheels.sh [DIR]        # default DIR: .whl (git-ignored)
#
# Versions: the ones bgmask's lock uses (pyproject.toml) where it names them; their dependencies at the
# versions of the project's pinned venv. Every wheel is fetched with --no-deps for CPython 3.12 on
# x86-64 manylinux, so the set is exactly this list, one version of each (two versions of one package
# would stop `pip install --no-deps`). wandb is left out: the check runs with --wandb off.
# PY_VERSION=3.13 fetches for another Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}

# package==version   # why it is needed (what the GPU image lacks)
WHEELS=(
  captum==0.9.0            # InputXGradient: the final attribution
  mmengine==0.10.7         # MMSeg's config / runner library
  mmcv-lite==2.1.0         # pure-PyTorch ops (multi-scale deformable attention of Mask2Former)
  mmsegmentation==1.2.2    # the segmentors
  mmdet==3.3.0             # Mask2Former's head and its losses
  ftfy==6.3.1              # mmseg's text utilities, imported by mmseg.models
  addict==2.4.0            # mmengine, mmcv
  yapf==0.43.0             # mmengine, mmcv (config pretty-printing)
  platformdirs==4.14.9     # yapf
  termcolor==3.3.0         # mmengine
  prettytable==3.19.0      # mmseg
  wcwidth==0.9.5           # prettytable, ftfy
  terminaltables==3.1.10   # mmdet
  pycocotools==2.0.11      # mmdet (mask structures); binary wheel
  shapely==2.2.0           # mmdet (mask structures); binary wheel
)

mkdir -p "$DIR"
ignored=0
git check-ignore -q "$DIR/x.whl" 2>/dev/null || ignored=$?
if [ "$ignored" = 1 ]; then  # 1: inside this repository and not ignored (128: outside it, or no git)
  echo "note: $DIR is not git-ignored here: keep the wheels out of commits" >&2
fi
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
specs=()
for w in "${WHEELS[@]}"; do specs+=("${w%%#*}"); done
# Lifts a local pip constraint file (e.g. a cap on torch) that has nothing to say about these wheels.
PIP_CONSTRAINT= "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$DIR" "${specs[@]}"
# One version of each package: an older wheel left in DIR by an earlier run would stop the install.
"$PY" - "$DIR" "${specs[@]}" <<'EOF'
import re, sys
from pathlib import Path

folder, specs = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wanted = {norm(s.split("==")[0]): s.split("==")[1] for s in specs}
seen = {}
for whl in sorted(folder.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    seen.setdefault(norm(name), []).append((version, whl))
extra = [w.name for n, vs in seen.items() for v, w in vs if wanted.get(n) != v]
missing = [n for n in wanted if n not in seen]
if extra or missing:
    sys.exit(f"error: {folder} holds {', '.join(extra) or 'nothing extra'} beyond this list; missing: "
             f"{', '.join(missing) or 'none'} (empty the folder and run again)")
mib = sum(w.stat().st_size for vs in seen.values() for _, w in vs) / 2**20
print(f"{len(seen)} wheels in {folder} ({mib:.1f} MiB), one version each")
EOF
