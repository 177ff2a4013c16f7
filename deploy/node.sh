#!/usr/bin/env bash
# The paper's job on one GPU node, stage by stage (deploy/README.md explains each stage, its cost and its fleet form):
#
#   RF_WORK=/runs/in1k-rf RF_REAL=/data/imagenet/train RF_BASE=/models/sd15 RF_CLIP=/models/clip-vit-large-patch14 \
#   RF_CAPTIONER=/models/blip2-opt-2.7b RF_VAL=/data/imagenet/val RF_VAL_LABELS=/data/imagenet/LOC_val_solution.csv \
#     deploy/node.sh all                    (or one or more stages, in order: deploy/node.sh export generate)
#
# Stages: captions encoder finetune export generate finish classify. Every stage can be re-run after any crash or
# stop: it resumes (captions, finetune, generate) or keeps what is already complete (encoder, export, pack), so
# `deploy/node.sh all` again after a failure at hour 30 redoes nothing finished.
#
# Required (local directories; nothing is downloaded):
#   RF_WORK       where the job writes: captions.jsonl, base/, finetune/, onnx/, engines/, repo/, synthetic/,
#                 synthetic.wds/, classifier/, logs/ (the servers' and shards' logs, one set per run)
#   RF_REAL       the real training ImageFolder (ImageNet: train/ with one wnid folder per class)
#   RF_BASE       the base model, diffusers layout (SD-1.5)
#   RF_CLIP       a CLIP ViT-L/14 for the guidance token (stage encoder; not needed if RF_BASE has image_encoder/)
#   RF_CAPTIONER  an image-to-text model (BLIP-2; stage captions; not needed if RF_CAPTIONS exists complete)
#   RF_VAL        the validation set (stage classify): class folders, or ILSVRC-2012's flat folder
# Optional (the full-scale value by default):
#   RF_GPUS=8             processes per stage: caption and finetune ranks, servers and generation shards, classify
#                         ranks (one GPU each)
#   RF_CLASSES=imagenet   the class set
#   RF_CAPTIONS           the captions file (default RF_WORK/captions.jsonl)
#   RF_VERSIONS=1         synthetic images per real image (1: 1x; 10: the paper's 10x)
#   RF_RUNTIME=tensorrt   the served runtime (rf-export repo --runtime); tensorrt builds plans first
#   RF_BATCH_SIZES=1,4,8,16  the batch sizes the TensorRT plans are built for
#   RF_VAL_NAME=in1k      the name RF_VAL is reported under; RF_VAL_LABELS its labels file for a flat folder
#   RF_CAPTION_PROMPT="a photo of"  the text each caption continues
#   RF_CAPTION_ARGS, RF_FINETUNE_ARGS, RF_EXPORT_ARGS, RF_SERVE_ARGS, RF_GENERATE_ARGS, RF_PACK_ARGS,
#   RF_CLASSIFY_ARGS      more options of each command (the defaults below are the recipe's); RF_SERVE_ARGS is
#                         where a full Triton install goes: "--triton-bin /opt/tritonserver/bin/tritonserver"
set -euo pipefail

: "${RF_WORK:?set RF_WORK to the folder the job writes into}"
: "${RF_REAL:?set RF_REAL to the real training ImageFolder}"
gpus="${RF_GPUS:-8}"
classes="${RF_CLASSES:-imagenet}"
captions="${RF_CAPTIONS:-$RF_WORK/captions.jsonl}"
runtime="${RF_RUNTIME:-tensorrt}"
synthetic="$RF_WORK/synthetic"
logs="$RF_WORK/logs"
mkdir -p "$RF_WORK" "$logs"
train="$(command -v rf-train)" || { echo "error: rf-train is not on PATH (pip install '.[server,gpu]')" >&2; exit 2; }

say() { echo "== node.sh $*"; }

stage_captions() {
  : "${RF_CAPTIONER:?set RF_CAPTIONER to a local BLIP-2 (or other image-to-text) model directory}"
  say "captions: $gpus processes -> $captions"
  # shellcheck disable=SC2086  # RF_CAPTION_ARGS is a list of options
  torchrun --standalone --nproc-per-node "$gpus" "$train" caption --real "$RF_REAL" --model "$RF_CAPTIONER" \
    --classes "$classes" --out "$captions" --prompt "${RF_CAPTION_PROMPT-a photo of}" ${RF_CAPTION_ARGS:---batch-size 64}
}

base_with_encoder() {
  if [ -d "$RF_BASE/image_encoder" ]; then echo "$RF_BASE"; else echo "$RF_WORK/base"; fi
}

stage_encoder() {
  : "${RF_BASE:?set RF_BASE to the base model (diffusers layout)}"
  local base
  base="$(base_with_encoder)"
  if [ -f "$base/model_index.json" ] && [ -d "$base/image_encoder" ]; then
    say "encoder: $base has image_encoder/ already"
    return
  fi
  : "${RF_CLIP:?set RF_CLIP to a local CLIP ViT-L/14 for the guidance token}"
  say "encoder: $RF_BASE + $RF_CLIP -> $base"
  rm -rf "$base"  # a copy stopped half-way (the command writes it whole or refuses an existing folder)
  rf-train add-image-encoder --bundle "$RF_BASE" --image-encoder "$RF_CLIP" --out "$base"
}

stage_finetune() {
  : "${RF_BASE:?set RF_BASE to the base model (diffusers layout)}"
  local launch=(accelerate launch --num_processes "$gpus" --num_machines 1 --mixed_precision no --dynamo_backend no)
  # without --multi_gpu, accelerate launch runs ONE process whatever --num_processes says (measured on CPU)
  [ "$gpus" -gt 1 ] && launch+=(--multi_gpu)
  say "finetune: $gpus processes -> $RF_WORK/finetune"
  # shellcheck disable=SC2086  # RF_FINETUNE_ARGS is a list of options
  "${launch[@]}" "$train" finetune --bundle "$(base_with_encoder)" --real "$RF_REAL" --captions "$captions" \
    --classes "$classes" --out "$RF_WORK/finetune" ${RF_FINETUNE_ARGS:---batch-size 8 --epochs 1 --precision auto}
}

stage_export() {
  say "export: $RF_WORK/finetune/bundle -> onnx/ -> repo/ ($runtime)"
  rf-export onnx "$RF_WORK/finetune/bundle" --out "$RF_WORK/onnx" --if-changed
  local engines=()
  if [ "$runtime" = tensorrt ]; then
    rf-export engines "$RF_WORK/onnx" --out "$RF_WORK/engines" --batch-sizes "${RF_BATCH_SIZES:-1,4,8,16}" \
      --precision auto
    engines=(--engines "$RF_WORK/engines")
  fi
  rm -rf "$RF_WORK/repo.tmp"
  # shellcheck disable=SC2086  # RF_EXPORT_ARGS is a list of options
  rf-export repo "$RF_WORK/onnx" --out "$RF_WORK/repo.tmp" --runtime "$runtime" "${engines[@]}" ${RF_EXPORT_ARGS:-}
  rm -rf "$RF_WORK/repo" && mv "$RF_WORK/repo.tmp" "$RF_WORK/repo"
}

stage_generate() {
  # one server per GPU and one shard of the job against it (each pipeline's calls stay on its GPU; the same
  # split as deploy/slurm/generate.sbatch); re-run to resume every shard from its manifest
  local servers=() clients=() urls=() g url status=0 stamp
  stamp="$(date +%Y%m%d-%H%M%S)"  # each run its own logs (a re-run's server must not read the last one's URL)
  stop_all() {
    for p in "${clients[@]}" "${servers[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  }
  trap 'stop_all; exit 143' TERM INT HUP
  for ((g = 0; g < gpus; g++)); do
    # shellcheck disable=SC2086  # RF_SERVE_ARGS is a list of options
    CUDA_VISIBLE_DEVICES="$g" rf-serve --repo "$RF_WORK/repo" --http-port 0 --grpc-port 0 --metrics-port 0 \
      ${RF_SERVE_ARGS:-} >"$logs/serve-$g.$stamp.log" 2>&1 &
    servers+=($!)
  done
  for ((g = 0; g < gpus; g++)); do
    url=""
    while [ -z "$url" ]; do
      if ! kill -0 "${servers[$g]}" 2>/dev/null; then
        echo "error: rf-serve on GPU $g exited before Triton was ready; log: $logs/serve-$g.$stamp.log" >&2
        tail -5 "$logs/serve-$g.$stamp.log" >&2
        stop_all
        exit 2
      fi
      sleep 1
      url="$(sed -n 's/^Triton ready: HTTP \([^,]*\),.*/\1/p' "$logs/serve-$g.$stamp.log")"
    done
    urls+=("$url")
  done
  say "generate: $gpus shards against ${urls[*]} -> $synthetic"
  local mode=(--real "$RF_REAL" --versions "${RF_VERSIONS:-1}")
  [ "$captions" = none ] || mode+=(--captions "$captions")
  for ((g = 0; g < gpus; g++)); do
    # shellcheck disable=SC2086  # RF_GENERATE_ARGS is a list of options
    rf-client generate --classes "$classes" "${mode[@]}" --url "${urls[$g]}" --shard "$g/$gpus" --out "$synthetic" \
      --quiet ${RF_GENERATE_ARGS:---format jpeg --quality 95 --batch-size 8 --concurrency 4} \
      >"$logs/generate-$g.$stamp.log" 2>&1 &
    clients+=($!)
  done
  for ((g = 0; g < gpus; g++)); do
    if ! wait "${clients[$g]}"; then
      echo "error: shard $g/$gpus failed; log: $logs/generate-$g.$stamp.log (re-run this stage to resume it)" >&2
      tail -5 "$logs/generate-$g.$stamp.log" >&2
      status=1
    fi
  done
  clients=()
  stop_all
  trap - TERM INT HUP
  return "$status"
}

stage_finish() {
  say "finish: verify, merge, pack -> $synthetic.wds"
  rf-client verify "$synthetic"
  rf-client merge "$synthetic"
  rm -rf "$synthetic.wds.tmp"
  # shellcheck disable=SC2086  # RF_PACK_ARGS is a list of options
  rf-client pack "$synthetic" --out "$synthetic.wds.tmp" ${RF_PACK_ARGS:---shard-size 1000}
  rm -rf "$synthetic.wds" && mv "$synthetic.wds.tmp" "$synthetic.wds"
}

stage_classify() {
  : "${RF_VAL:?set RF_VAL to the validation set}"
  local name="${RF_VAL_NAME:-in1k}" val=()
  val=(--val "$name=$RF_VAL")
  [ -z "${RF_VAL_LABELS:-}" ] || val+=(--val-labels "$name=$RF_VAL_LABELS")
  say "classify: $gpus processes on $synthetic.wds -> $RF_WORK/classifier"
  # shellcheck disable=SC2086  # RF_CLASSIFY_ARGS is a list of options
  torchrun --standalone --nproc-per-node "$gpus" "$train" classify --classes "$classes" \
    --synthetic "$synthetic.wds" "${val[@]}" --out "$RF_WORK/classifier" \
    ${RF_CLASSIFY_ARGS:---recipe torchvision-resnet50 --workers 8}
}

all=(captions encoder finetune export generate finish classify)
[ "$#" -gt 0 ] || { echo "usage: deploy/node.sh all | STAGE... (stages: ${all[*]})" >&2; exit 2; }
stages=("$@")
[ "$*" = all ] && stages=("${all[@]}")
for s in "${stages[@]}"; do
  case " ${all[*]} " in
    *" $s "*) ;;
    *) echo "error: unknown stage '$s' (stages: ${all[*]}, or all)" >&2; exit 2 ;;
  esac
done
for s in "${stages[@]}"; do
  started=$SECONDS
  "stage_$s"
  say "$s done in $((SECONDS - started)) s"
done
