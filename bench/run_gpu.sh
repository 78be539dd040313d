#!/usr/bin/env bash
# Run GPU benchmark stages on a 2-GPU (tknp4: 4-GPU) machine; logs and results go to $OUT (default bench/results).
#   bash bench/run_gpu.sh tests allreduce decode vs_transformers tp_scaling radix tknp [tknp4]
# Each stage runs in its own process under a time limit; a failing stage does not stop the others.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT/results"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HYBRIDPAR_RESULTS_DIR="$OUT/results" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
export HYBRIDPAR_CACHE=${HYBRIDPAR_CACHE:-/tmp/hybridpar-cache}
PY=${PY:-python3}
n=$(nvidia-smi -L 2>/dev/null | wc -l); host="nvidia-h200-x$n"  # the device tool's kind this runs on
one="NVIDIA H200 (1 of $host)"; two="2x NVIDIA H200 ($host)"; four="4x NVIDIA H200 ($host)"
LIMIT=${LIMIT:-240}  # seconds per stage; LIMIT_<stage> overrides it for one stage
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)" | tee -a "$OUT/log.txt"
  case $stage in
    tests) cmd=("$PY" -m pytest tests/test_decode_fast_path.py -q -m gpu -x -p no:cacheprovider); label=$two ;;
    allreduce) cmd=("$PY" bench/bench_allreduce.py); label=$two ;;
    decode) cmd=("$PY" bench/bench_decode.py); label=$one ;;
    vs_transformers) cmd=("$PY" bench/bench_vs_transformers.py); label=$one ;;
    tp_scaling) cmd=("$PY" bench/bench_tp_scaling.py); label=$two ;;
    radix) cmd=("$PY" bench/bench_radix.py); label=$one ;;
    tknp) cmd=("$PY" bench/bench_tknp.py --iters 6); label=$two ;;
    tknp4) cmd=("$PY" bench/bench_tknp.py --gpus 4 --iters 6); label=$four ;;
    decode_compiled) cmd=("$PY" bench/bench_decode.py --modes graph compiled --tag _compiled); label=$one ;;
    vs_transformers_compiled) cmd=("$PY" bench/bench_vs_transformers.py --compile); label=$one ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  limit_var="LIMIT_$stage"; limit=${!limit_var:-$LIMIT}
  HYBRIDPAR_DEVICE_LABEL=$label timeout "$limit" "${cmd[@]}" 2>&1 | tee -a "$OUT/log.txt" | tail -60
  echo "=== $stage exit ${PIPESTATUS[0]} $(date -u +%H:%M:%S)" | tee -a "$OUT/log.txt"
done
