#!/usr/bin/env bash
# Start-up of the serving image: export the mounted bundle once (cached in the /models volume), build or keep
# TensorRT plans for the GPU this container runs on, write the repository for the chosen runtime, serve it.
#   RF_RUNTIME      tensorrt (default) | onnxruntime | pytorch (GPU) | openvino | python-ort (CPU hosts)
#   RF_BATCH_SIZES  image batch sizes the engines are optimised for (default 1,4,8,16)
#   RF_PLACEMENT    tensorrt: bls (default; plans as native tensorrt_plan models) | inprocess (plans inside each
#                   pipeline instance, on its own GPU); RF_COMPONENTS, its old name, is read when it is unset
#   RF_PRECISION    openvino precision: fp32 (default) | bf16 | int8 (the UNet is quantized once, kept in the volume);
#                   RF_DTYPE, its old name, is read when it is unset
#   RF_CLASSES      class set whose prompts calibrate the int8 UNet (default imagenet)
#   RF_CUDA_POOL_MB Triton's CUDA memory pool per GPU, through which the Python backend passes GPU tensors
#                   (default 512; realfake.core.defaults.CUDA_MEMORY_POOL_MB says why)
# A container that sees several GPUs serves them with RF_PLACEMENT=inprocess only: with bls, Triton may send a
# pipeline's BLS calls to another GPU's component. Run one container per GPU (docker run --gpus device=K) instead.
set -euo pipefail
models="${RF_MODELS:-/models}"
runtime="${RF_RUNTIME:-tensorrt}"
placement="${RF_PLACEMENT:-${RF_COMPONENTS:-bls}}"
gpus=0
if command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ ! -f "$models/bundle/model_index.json" ] && [ ! -f "$models/repo/pipeline/config.pbtxt" ]; then
  echo "error: mount a diffusers-layout bundle at $models/bundle (or a ready repository at $models/repo)" >&2
  exit 2
fi
if [ -f "$models/bundle/model_index.json" ]; then
  # Server pods that share one models volume (a Kubernetes ReadWriteMany claim) and start together take turns: the
  # first exports and builds, the others then find everything up to date. The lock goes with this shell's exit.
  if command -v flock >/dev/null; then
    exec 9>"$models/.rf-prepare.lock"
    flock 9
  fi
  if [ "$gpus" -gt 1 ] && [ "$placement" = bls ] && { [ "$runtime" = tensorrt ] || [ "$runtime" = onnxruntime ]; }; then
    echo "error: this container sees $gpus GPUs, and with RF_PLACEMENT=bls a pipeline's BLS calls may run on another" \
      "GPU's component: run one container per GPU (docker run --gpus device=K) or RF_PLACEMENT=inprocess" \
      "(RF_RUNTIME=tensorrt)" >&2
    exit 2
  fi
  case "$runtime" in
    tensorrt|onnxruntime|pytorch)
      if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "error: RF_RUNTIME=$runtime needs a GPU in the container (docker run --gpus all);" \
          "on CPU-only hosts use RF_RUNTIME=openvino" >&2
        exit 2
      fi ;;
  esac
  # exported again when the mounted bundle is not the one the export was made from (a replaced or finetuned bundle
  # must never keep serving the old model); TensorRT plans follow the graphs' digests, so they are rebuilt too
  rf-export onnx "$models/bundle" --out "$models/onnx" --if-changed
  case "$runtime" in
    tensorrt)
      rf-export engines "$models/onnx" --out "$models/engines" --batch-sizes "${RF_BATCH_SIZES:-1,4,8,16}"
      rf-export repo "$models/onnx" --out "$models/repo" --runtime tensorrt --engines "$models/engines" \
        --placement "$placement" ;;
    pytorch)
      rf-export repo "$models/onnx" --out "$models/repo" --runtime pytorch --bundle "$models/bundle" ;;
    openvino)
      precision="${RF_PRECISION:-${RF_DTYPE:-fp32}}"
      if [ "$precision" = int8 ] && [ ! -f "$models/onnx/unet.int8.xml" ]; then
        rf-export quantize "$models/onnx" --out "$models/onnx" --classes "${RF_CLASSES:-imagenet}"
      fi
      rf-export repo "$models/onnx" --out "$models/repo" --runtime openvino --precision "$precision" ;;
    *)
      rf-export repo "$models/onnx" --out "$models/repo" --runtime "$runtime" ;;
  esac
  if command -v flock >/dev/null; then
    flock -u 9
    exec 9>&-
  fi
fi
pool=()
for ((g = 0; g < gpus; g++)); do
  pool+=("--cuda-memory-pool-byte-size=$g:$((${RF_CUDA_POOL_MB:-512} * 1048576))")
done
exec tritonserver --model-repository="$models/repo" "${pool[@]}" "$@"
