#!/usr/bin/env bash
# Install each peer runtime in its own venv under .cache/peers (none is a project dependency).
#   llamacpp: llama-cpp-python 0.3.36 (builds from source, ~5 min on 2 cores)
#   ortgenai: onnxruntime-genai 0.18.0 + its model builder (needs transformers 5.x, torch CPU)
#   optimum:  optimum-onnx[onnxruntime] 0.1.0 (ORTModelForCausalLM)
# Usage: benchmarks/peers/setup.sh [llamacpp|ortgenai|optimum]...   (default: all). Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS="$ROOT/.cache/peers"
PY="${PYTHON:-python3.11}"
mkdir -p "$PEERS"
want=("$@"); [ ${#want[@]} -eq 0 ] && want=(llamacpp ortgenai optimum)

venv() {  # venv NAME CHECK_IMPORT PIP_ARGS...
  local name="$1" check="$2"; shift 2
  local v="$PEERS/$name"
  if [ -x "$v/bin/python" ] && "$v/bin/python" -c "import $check" 2>/dev/null; then
    echo "[$name] ready"; return 0
  fi
  echo "[$name] installing: $*"
  "$PY" -m venv "$v"
  "$v/bin/pip" install -q --upgrade pip
  "$v/bin/pip" install -q "$@"
  "$v/bin/python" -c "import $check" && echo "[$name] ready"
}

for p in "${want[@]}"; do
  case "$p" in
    llamacpp) CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" venv llamacpp llama_cpp llama-cpp-python==0.3.36 numpy psutil ;;
    ortgenai) venv ortgenai "onnxruntime_genai, transformers" onnxruntime-genai==0.18.0 onnx_ir "transformers>=5,<6" \
                torch==2.13.0 onnx psutil numpy safetensors sentencepiece protobuf ;;
    optimum) venv optimum "optimum.onnxruntime" "optimum-onnx[onnxruntime]==0.1.0" torch==2.13.0 psutil ;;
    *) echo "unknown peer $p" >&2; exit 2 ;;
  esac
done
