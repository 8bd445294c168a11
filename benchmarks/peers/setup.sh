#!/usr/bin/env bash
# Install each peer runtime in its own venv under .cache/peers (none is a project dependency).
#   llamacpp: llama-cpp-python 0.3.36 (builds from source with portable flags, ~6 min on 2 cores)
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

# llama.cpp's default native build (-march=native) segfaults in prefill on Intel hosts with AMX (FACTS.md), so
# build portably: AVX2/FMA/F16C everywhere, AMX off, and AVX-512 (+VNNI) only where this CPU lists them (an
# AVX2-only host would die of an illegal instruction). LLAMA_CMAKE_ARGS overrides all of it.
llamacpp_cmake_args() {
  local args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  args="$args -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  grep -qw avx512f /proc/cpuinfo && args="$args -DGGML_AVX512=ON"
  grep -qw avx512_vnni /proc/cpuinfo && args="$args -DGGML_AVX512_VNNI=ON"
  echo "$args"
}

for p in "${want[@]}"; do
  case "$p" in
    llamacpp) CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-$(llamacpp_cmake_args)}" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" \
                venv llamacpp llama_cpp --no-binary llama-cpp-python --no-cache-dir llama-cpp-python==0.3.36 numpy psutil
              echo "[llamacpp] built with CMAKE_ARGS=${LLAMA_CMAKE_ARGS:-$(llamacpp_cmake_args)}" ;;
    ortgenai) venv ortgenai "onnxruntime_genai, transformers" onnxruntime-genai==0.18.0 onnx_ir "transformers>=5,<6" \
                torch==2.13.0 onnx psutil numpy safetensors sentencepiece protobuf ;;
    optimum) venv optimum "optimum.onnxruntime" "optimum-onnx[onnxruntime]==0.1.0" torch==2.13.0 psutil ;;
    *) echo "unknown peer $p" >&2; exit 2 ;;
  esac
done
