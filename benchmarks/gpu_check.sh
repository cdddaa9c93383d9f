#!/usr/bin/env bash
# The GPU check, as one prepared command for a CUDA machine (e.g. the lent H200, no network):
#   1. a CUDA smoke run of the training paths the CPU tests cannot reach: fp16 autocast with the grad
#      scaler, bf16 + channels_last + late masking, torch.compile (inductor), torchrun with nccl;
#   2. `run_all.py --gpu`: the benchmark table at 224 px (ConvNeXt-T, ViT-S/14, bf16).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [run_all.py flags, e.g. --torchcompile]
#
# bgmask runs from this checkout (PYTHONPATH), on the machine's own torch / torchvision / timm. Wheels
# in .whl/ (e.g. the MMSeg stack for the mask rows; see benchmarks/README.md) are installed first.
# SMOKE_DEVICE=cpu runs the smoke part on the CPU (a dry run of this script without a GPU).
# The whole script stops within BUDGET_S seconds (default 570: one 10-minute device command with room
# for the start): each smoke run gets at most 120 s and the benchmark what is left.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [run_all.py flags]}
shift
DEVICE=${SMOKE_DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-570}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bgmask_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/bgmask_site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__, 'cuda', torch.cuda.is_available())"

echo "== smoke: training paths on $DEVICE"
DATA="$OUT/smoke_data"
"$PY" -m bgmask make-synthetic --out "$DATA" --num_classes 4 --train_per_class 24 --test_per_class 6 --overwrite >/dev/null
common=(--data_path "$DATA" --image_size 64 --batch_size 16 --epochs 2 --num_workers 2 --no_progress --device "$DEVICE")
smoke() {  # name, script, flags...
  local name=$1 script=$2; shift 2
  local t0=$SECONDS
  if timeout 120 "$PY" "$script" "${common[@]}" --snapshot_dir "$OUT/smoke_$name" "$@" > "$OUT/smoke_$name.log" 2>&1; then
    echo "ok   $name ($((SECONDS - t0)) s): $(grep -m1 'Waterbirds accuracy' "$OUT/smoke_$name.log" || true)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s):"; tail -5 "$OUT/smoke_$name.log"
  fi
}
smoke fp16_scaler early_masking_and_baseline/train.py --model_arch bgmask_resnet_tiny --strategy early --use_amp --amp_dtype fp16
smoke bf16_late_cl late_masking/train.py --model_arch bgmask_convnext_tiny --use_amp --channels_last
smoke vit_late_compile late_masking/train.py --model_arch bgmask_vit_tiny --patch_tokens_only --torchcompile
if [ "$DEVICE" = cuda ]; then
  t0=$SECONDS
  ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")  # nccl: one process per GPU
  if timeout 120 "$PY" -m torch.distributed.run --nproc_per_node="$ngpu" early_masking_and_baseline/train.py \
      "${common[@]}" --snapshot_dir "$OUT/smoke_nccl" > "$OUT/smoke_nccl.log" 2>&1; then
    echo "ok   torchrun_nccl ($((SECONDS - t0)) s; $ngpu process(es))"
  else
    echo "FAIL torchrun_nccl:"; tail -5 "$OUT/smoke_nccl.log"
  fi
fi

left=$((BUDGET_S - SECONDS)); [ "$left" -lt 60 ] && left=60
echo "== benchmark (at most $left s)"
timeout "$left" "$PY" benchmarks/run_all.py --gpu --out "$OUT/bench" "$@"
