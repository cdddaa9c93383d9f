#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine with no network (e.g. a Python 3.12 / torch image), within
# one 10-minute slot. Steps, in order of value, each under its own timeout, each printing ONE result line
# (ok/FAIL, seconds, the process's peak CUDA memory, its key figures):
#   1. torchrun with one process per step (NCCL's process group) for baseline and late masking, 2 epochs;
#   2. DINOv2 ViT-L/14 (random weights, timm's architecture) at 518 px: frozen at batch 64 (the paper's
#      linear probe, fp32/TF32), then fine-tuned with bf16 autocast at the largest batch a probe finds,
#      then the same with --grad_checkpointing at twice that batch; each ends with the final evaluation
#      and its attribution (--attribution_batch_size);
#   3. smoke runs: fp16 autocast + grad scaler, bf16 + channels_last late masking, torch.compile; the
#      Waterbirds protocol: GroupDRO with late masking, then DFR on its checkpoint (`bgmask dfr`), whose
#      embeddings run on the device;
#   4. Mask2Former Swin-T (untrained; speed does not depend on weights) through mmcv-lite's PyTorch
#      deformable attention: forward and predict_masks speed, then online late masking with it (ViT-B/14
#      at 518 px, frozen, as the paper's late-masking command);
#   5. the benchmark table at 224 px (`run_all.py --gpu`) with the time that is left.
#
#   bash benchmarks/prepare_wheels.sh            # once, where pip reaches the registry: fills .whl/
#   bash benchmarks/gpu_check.sh OUT_DIR [run_all.py flags, e.g. --torchcompile]
#
# bgmask runs from this checkout (PYTHONPATH) on the machine's own torch / torchvision / timm; the wheels
# in .whl/ (captum, the MMSeg stack; see prepare_wheels.sh) are installed into a folder of their own with
# --no-index --no-deps. OUT_DIR ends with few files (a device slot returns at most 8): summary.txt (the
# result lines), results.jsonl (one JSON line per step), versions.txt, bench.md, logs.tgz (every log and
# run record). Work files (data, checkpoints) go to $GPU_CHECK_WORK (default OUT_DIR/work), removed at the
# end unless KEEP_WORK=1.
# Environment: PYTHON (default python3); BUDGET_S (the whole script: default 570 on CUDA, 1500 on the CPU);
# ONLY="NAME ..." (run only these steps); FT_BATCH=N (fine-tune ViT-L at batch N instead of probing);
# GPU_CHECK_WHEELS (the wheel folder, default .whl);
# SMOKE_DEVICE=cpu (a dry run on the CPU: the same steps at tiny sizes, limits x3; Mask2Former still runs at
# 512 px and takes most of it; fp16's one-line 'needs CUDA' refusal is the expected result; its time is
# in benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [run_all.py flags]}
shift
DEVICE=${SMOKE_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then BUDGET_S=${BUDGET_S:-570}; else BUDGET_S=${BUDGET_S:-1500}; fi
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$OUT/work}
LOGS=$WORK/logs
rm -f "$OUT/summary.txt" "$OUT/results.jsonl"
mkdir -p "$WORK" "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_DEBUG=INFO
STEP=("$PY" benchmarks/gpu_check_step.py)

pack() {  # the logs and run records (no checkpoints, no data) -> OUT/logs.tgz; work files away
  (cd "$WORK" && find . -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.txt' \
     -o -name '*.yaml' | grep -v '^./site/' | tar czf "$OUT/logs.tgz" -T - 2>/dev/null)
  [ -f "$WORK/bench/bench.md" ] && cp "$WORK/bench/bench.md" "$OUT/bench.md"
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
trap pack EXIT

if [ "$DEVICE" = cuda ]; then  # the paper's sizes
  VIT_SIZE=518 VIT_STEPS=4 FROZEN_BATCH=64 FT_BATCHES="64 48 40 32 24 16 12 8 4 2 1" WORKERS=8 ATTR_BATCH=8
  VIT_DATA=(--num_classes 4 --train_per_class 64 --test_per_class 8) SEG_BATCH=8 SEG_STEPS=10
  SMALL_DATA=(--num_classes 4 --train_per_class 24 --test_per_class 6) SMALL_CAP=()
  WB_DATA=(--num_classes 4 --train_per_class 40 --test_per_class 8)
  NCCL=(--nccl)  # a torchrun step without NCCL's initialisation in its log fails
  FT_AMP=(--use_amp) PROBE_AMP=bf16 LIMIT_SCALE=1
else  # dry run: the same steps at tiny sizes. ViT-L fine-tunes in fp32 here, because bf16 kernels are slow on
      # CPUs without bf16 instructions (the smoke runs dry-run bf16 autocast); limits x3.
  VIT_SIZE=28 VIT_STEPS=1 FROZEN_BATCH=4 FT_BATCHES="2 1" WORKERS=1 ATTR_BATCH=2
  VIT_DATA=(--num_classes 2 --train_per_class 4 --test_per_class 2) SEG_BATCH=2 SEG_STEPS=1
  SMALL_DATA=(--num_classes 2 --train_per_class 8 --test_per_class 2) SMALL_CAP=(--max_steps_per_epoch 1)
  WB_DATA=(--num_classes 4 --train_per_class 20 --test_per_class 4)  # DFR needs every group in val
  NCCL=(--note "gloo on the CPU")
  FT_AMP=() PROBE_AMP=none LIMIT_SCALE=3
fi

left() { echo $((BUDGET_S - SECONDS)); }
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
skip() {  # skip NAME WHY: a SKIP line for a step that was asked for
  wanted "$1" && echo "SKIP $1 ($2)" | tee -a "$OUT/summary.txt"
  return 0
}
# step NAME LIMIT_S [line flags...] -- COMMAND...: runs COMMAND under min(LIMIT_S, budget left - 10 s), its
# output in LOGS/NAME.log, then prints the one result line. ONLY="NAME ..." runs only the steps named.
REC=("${STEP[@]}" run --record)  # "${REC[@]}" FILE.json -- SCRIPT ARGS: the script, its CUDA peak recorded
step() {
  local name=$1 limit=$2; shift 2
  local line_args=()
  while [ "$1" != -- ]; do line_args+=("$1"); shift; done
  shift
  wanted "$name" || return 0
  limit=$((limit * LIMIT_SCALE))
  local budget=$(( $(left) - 10 ))
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 15 ]; then
    skip "$name" "budget spent"
    return 1
  fi
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  "${STEP[@]}" line "$name" --rc "$rc" --seconds $((SECONDS - t0)) --limit "$limit" --log "$LOGS/$name.log" \
      --results "$OUT/results.jsonl" "${line_args[@]}" | tee -a "$OUT/summary.txt"
  return "$rc"
}

# ------------------------------------------------------------------ set-up: wheels, versions, data
t0=$SECONDS
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1; then
    echo "FAIL wheels: $(tail -1 "$LOGS/wheels.log")" | tee -a "$OUT/summary.txt"
  fi
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
else
  echo "note: no wheels in $WHEELS (bash benchmarks/prepare_wheels.sh): steps that need captum or MMSeg will fail" \
    | tee -a "$OUT/summary.txt"
fi
{
  date -u +"%Y-%m-%d %H:%M UTC"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| cudnn", torch.backends.cudnn.version(),
          "| nccl", ".".join(map(str, torch.cuda.nccl.version())))
mods = ["torchvision", "timm", "numpy", "PIL", "sklearn", "captum", "mmengine", "mmcv", "mmseg", "mmdet", "wandb"]
found = []
for m in mods:
    try:
        found.append(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e:  # noqa: BLE001  (a missing optional package is a fact to print)
        found.append(f"{m} missing ({e.__class__.__name__})")
print(" | ".join(found))
EOF
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
command -v nvidia-smi > /dev/null && nvidia-smi > "$LOGS/nvidia-smi.log" 2>&1
DATA=$WORK/data_small
VDATA=$WORK/data_vit
WBDATA=$WORK/data_wb
"$PY" -m bgmask make-synthetic --out "$DATA" "${SMALL_DATA[@]}" --overwrite > "$LOGS/data.log" 2>&1 \
  && "$PY" -m bgmask make-synthetic --out "$VDATA" "${VIT_DATA[@]}" --overwrite >> "$LOGS/data.log" 2>&1 \
  && "$PY" -m bgmask make-synthetic --out "$WBDATA" "${WB_DATA[@]}" --waterbirds_splits \
     --overwrite >> "$LOGS/data.log" 2>&1 \
  || { echo "FAIL data: $(tail -1 "$LOGS/data.log")" | tee -a "$OUT/summary.txt"; exit 1; }
echo "== set-up $((SECONDS - t0)) s; device $DEVICE; budget $BUDGET_S s"

small=(--data_path "$DATA" --image_size 64 --batch_size 16 --epochs 2 --num_workers 2 --no_progress --device "$DEVICE"
       "${SMALL_CAP[@]}")
vit=(--data_path "$VDATA" --image_size "$VIT_SIZE" --epochs 1 --max_steps_per_epoch "$VIT_STEPS" --eval_mode none
     --num_workers "$WORKERS" --no_progress --device "$DEVICE" --attribution_images 8
     --attribution_batch_size "$ATTR_BATCH")
torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)

# ------------------------------------------------------------------ 1. torchrun, one process (NCCL on CUDA)
echo "== 1. torchrun --nproc_per_node=1"
step nccl_baseline 120 --run "$WORK/nccl_baseline" --record "$WORK/nccl_baseline.json" "${NCCL[@]}" -- \
  "${torchrun[@]}" benchmarks/gpu_check_step.py run --record "$WORK/nccl_baseline.json" -- \
  early_masking_and_baseline/train.py "${small[@]}" --model_arch bgmask_resnet_tiny \
  --snapshot_dir "$WORK/nccl_baseline"
step nccl_late 120 --run "$WORK/nccl_late" --record "$WORK/nccl_late.json" "${NCCL[@]}" -- \
  "${torchrun[@]}" benchmarks/gpu_check_step.py run --record "$WORK/nccl_late.json" -- \
  late_masking/train.py "${small[@]}" --model_arch bgmask_vit_tiny --patch_tokens_only \
  --snapshot_dir "$WORK/nccl_late"

# ------------------------------------------------------------------ 2. ViT-L/14 at the paper's size
VITL=vit_large_patch14_dinov2  # no .lvd142m tag and no --pretrained: random weights, nothing downloaded
echo "== 2. $VITL (random weights) at $VIT_SIZE px"
step vitl_frozen 150 --run "$WORK/vitl_frozen" --record "$WORK/vitl_frozen.json" --note "batch $FROZEN_BATCH fp32" -- \
  "${REC[@]}" "$WORK/vitl_frozen.json" -- early_masking_and_baseline/train.py "${vit[@]}" --model_arch "$VITL" \
  --freeze_backbone --batch_size "$FROZEN_BATCH" --snapshot_dir "$WORK/vitl_frozen"
ft_batch=${FT_BATCH:-0}
# shellcheck disable=SC2086  # FT_BATCHES is a list of numbers
if [ "$ft_batch" = 0 ] && wanted vitl_probe && step vitl_probe 120 --record "$WORK/vitl_probe.json" \
    --note "batches tried: $FT_BATCHES" -- \
    "${STEP[@]}" probe --model "$VITL" --image_size "$VIT_SIZE" --batches $FT_BATCHES --amp "$PROBE_AMP" \
    --device "$DEVICE" --record "$WORK/vitl_probe.json"; then
  ft_batch=$(tail -1 "$LOGS/vitl_probe.log")
  echo "   largest fitting fine-tuning batch: $ft_batch"
fi
if [ "$ft_batch" -gt 0 ] 2>/dev/null; then
  step vitl_finetune 150 --run "$WORK/vitl_ft" --record "$WORK/vitl_ft.json" \
    --note "batch $ft_batch ${FT_AMP[*]:-fp32}" -- \
    "${REC[@]}" "$WORK/vitl_ft.json" -- early_masking_and_baseline/train.py "${vit[@]}" --model_arch "$VITL" \
    --batch_size "$ft_batch" "${FT_AMP[@]}" --drop_path 0.1 --snapshot_dir "$WORK/vitl_ft"
  step vitl_finetune_ckpt 150 --run "$WORK/vitl_ckpt" --record "$WORK/vitl_ckpt.json" \
    --note "batch $((2 * ft_batch)) ${FT_AMP[*]:-fp32} + grad checkpointing" -- \
    "${REC[@]}" "$WORK/vitl_ckpt.json" -- early_masking_and_baseline/train.py "${vit[@]}" --model_arch "$VITL" \
    --batch_size $((2 * ft_batch)) "${FT_AMP[@]}" --grad_checkpointing --snapshot_dir "$WORK/vitl_ckpt"
else
  skip vitl_finetune "no batch: see vitl_probe, or set FT_BATCH"
fi

# ------------------------------------------------------------------ 3. precision / compile smoke runs
echo "== 3. smoke runs"
fp16_expect=(); [ "$DEVICE" = cuda ] || fp16_expect=(--expect_fail "needs CUDA")  # refused on the CPU, as it must
step fp16_scaler 120 "${fp16_expect[@]}" --run "$WORK/fp16_scaler" --record "$WORK/fp16_scaler.json" -- \
  "${REC[@]}" "$WORK/fp16_scaler.json" -- early_masking_and_baseline/train.py "${small[@]}" \
  --model_arch bgmask_resnet_tiny --strategy early --use_amp --amp_dtype fp16 --snapshot_dir "$WORK/fp16_scaler"
step bf16_late_cl 120 --run "$WORK/bf16_late_cl" --record "$WORK/bf16_late_cl.json" -- \
  "${REC[@]}" "$WORK/bf16_late_cl.json" -- late_masking/train.py "${small[@]}" --model_arch bgmask_convnext_tiny \
  --use_amp --channels_last --snapshot_dir "$WORK/bf16_late_cl"
step vit_late_compile 150 --run "$WORK/vit_late_compile" --record "$WORK/vit_late_compile.json" -- \
  "${REC[@]}" "$WORK/vit_late_compile.json" -- late_masking/train.py "${small[@]}" --model_arch bgmask_vit_tiny \
  --patch_tokens_only --torchcompile --snapshot_dir "$WORK/vit_late_compile"

step wb_groupdro 120 --run "$WORK/wb_groupdro" --record "$WORK/wb_groupdro.json" -- \
  "${REC[@]}" "$WORK/wb_groupdro.json" -- late_masking/train.py "${small[@]}" --data_path "$WBDATA" \
  --protocol waterbirds --method groupdro --model_arch bgmask_resnet_tiny --snapshot_dir "$WORK/wb_groupdro"
if [ -f "$WORK/wb_groupdro/last.pt" ]; then
  step wb_dfr 90 --run "$WORK/wb_groupdro/dfr" --record "$WORK/wb_dfr.json" -- \
    "${REC[@]}" "$WORK/wb_dfr.json" -- -m bgmask dfr --checkpoint "$WORK/wb_groupdro/last.pt" --data_path "$WBDATA" \
    --device "$DEVICE" --num_workers 2 --no_progress
else
  skip wb_dfr "no checkpoint: see wb_groupdro"
fi

# ------------------------------------------------------------------ 4. Mask2Former Swin-T through mmcv-lite
echo "== 4. Mask2Former Swin-T"
M2F=mmsegmentation/configs/mask2former/mask2former_swin-t_8xb2-160k_cub_binary_seg-512x512.py
step m2f_forward 120 --bench "$WORK/m2f.json" --record "$WORK/m2f_forward.json" -- \
  "${REC[@]}" "$WORK/m2f_forward.json" -- benchmarks/bench_seg.py --data_path "$VDATA" --config "$M2F" \
  --device "$DEVICE" --batch_size "$SEG_BATCH" --steps "$SEG_STEPS" --repeats 1 \
  --save_checkpoint "$WORK/m2f_untrained.pth" --json "$WORK/m2f.json"
if [ -f "$WORK/m2f_untrained.pth" ]; then
  step m2f_online_late 150 --run "$WORK/m2f_late" --record "$WORK/m2f_late.json" \
    --note "ViT-B/14 frozen, batch 16, seg batch $SEG_BATCH" -- \
    "${REC[@]}" "$WORK/m2f_late.json" -- late_masking/train.py "${vit[@]}" --model_arch vit_base_patch14_dinov2 \
    --freeze_backbone --batch_size 16 --seg_model_config_path "$M2F" \
    --seg_model_checkpoint_path "$WORK/m2f_untrained.pth" --seg_batch_size "$SEG_BATCH" --snapshot_dir "$WORK/m2f_late"
else
  skip m2f_online_late "no segmenter checkpoint: see m2f_forward"
fi

# ------------------------------------------------------------------ 5. the benchmark table at 224 px
echo "== 5. run_all.py --gpu ($(left) s left)"
if [ "$DEVICE" = cuda ]; then bench_args=("$@"); else
  bench_args=(--device cpu --models bgmask_resnet_tiny --image_size 32 --batch_size 2 --steps 1 --warmup 1 --repeats 1
              --seg_batch 2 --data_batches 1 --num_workers 1 --only generation train "$@")
fi
[ "$DEVICE" = cuda ] && [ "$(left)" -lt 300 ] && bench_args+=(--repeats 1)  # one repeat fits a short remainder
step bench 600 --bench "$WORK/bench/bench.json" -- \
  "$PY" benchmarks/run_all.py --gpu --out "$WORK/bench" "${bench_args[@]}"

failed=$(grep -c '^FAIL' "$OUT/summary.txt")
oks=$(grep -c '^ok' "$OUT/summary.txt")
skips=$(grep -c '^SKIP' "$OUT/summary.txt")
echo "== done in $SECONDS s: $oks ok, $failed failed, $skips skipped (summary: $OUT/summary.txt)" \
  | tee -a "$OUT/summary.txt"
[ "$failed" = 0 ]
