#!/usr/bin/env bash
# Export the mounted bundle once (cached in the /models volume), write the repository, start Triton.
set -euo pipefail
models="${RF_MODELS:-/models}"
if [ ! -f "$models/repo/pipeline/config.pbtxt" ]; then
  if [ ! -f "$models/bundle/model_index.json" ]; then
    echo "error: mount a diffusers-layout bundle at $models/bundle or a repository at $models/repo" >&2
    exit 2
  fi
  [ -f "$models/onnx/export.json" ] || rf-export onnx "$models/bundle" "$models/onnx"
  rf-export repo "$models/onnx" --out "$models/repo"
fi
exec tritonserver --model-repository="$models/repo" "$@"
