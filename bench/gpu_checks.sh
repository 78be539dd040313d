#!/usr/bin/env bash
# NCCL correctness checks on a 2-GPU machine (the device tool's nvidia-h200-x2; verify4 on nvidia-h200-x4), logs under $OUT.
#   bash bench/gpu_checks.sh [tests|verify|kernels|serving|labs ...]   (default: tests verify; kernels and serving: one GPU)
# The GPU image has torch and transformers but no Jupyter/pytest stack: wheels for those are
# carried in .whl/ (see bench/results/README.md) and installed into /tmp/site.
set -uo pipefail
OUT=${OUT:-/tmp/hybridpar-gpu-checks}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
status=0
run() {  # run NAME CMD...: tee into $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/summary.log"
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc" | tee -a "$OUT/summary.log"
  [ $rc -eq 0 ] || status=1
}
{ date -u +%FT%TZ; nvidia-smi -L; python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; git log -1 --format='commit %H' 2>/dev/null; } | tee "$OUT/summary.log"
for what in "${@:-tests verify}"; do for w in $what; do case $w in
  tests)
    run gpu_tests python3 -m pytest -p no:cacheprovider -q -m gpu $(grep -l "mark.gpu" tests/test_*.py) ;;
  serving)
    run serving_smoke python3 bench/gpu_serve_smoke.py ;;
  kernels)  # one GPU: the Triton kernels against the PyTorch path, and the fast path against transformers in bf16
    run fused_ops python3 -m pytest -p no:cacheprovider -q tests/test_fused_ops.py
    run decode_kernels python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_attention_backends.py tests/test_decode_fast_path.py
    run verify_tp1_bf16 python3 -m hybridpar.models.verify --tp 1 --dtype bf16 --backend nccl
    run verify_llama_tp1_bf16 python3 -m hybridpar.models.verify --tp 1 --dtype bf16 --backend nccl --model-name llama-tiny ;;
  verify)
    run verify_tp2_fp32 python3 -m hybridpar.models.verify --tp 2 --dtype fp32 --backend nccl
    run verify_tp2_bf16 python3 -m hybridpar.models.verify --tp 2 --dtype bf16 --backend nccl
    run verify_llama_tp2_bf16 python3 -m hybridpar.models.verify --tp 2 --dtype bf16 --backend nccl --model-name llama-tiny
    run verify_tknp2 python3 -m hybridpar.tknp.verify --token-parallel-size 2 --backend nccl ;;
  verify_bf16)  # both tiny families at once
    python3 -m hybridpar.models.verify --tp 2 --dtype bf16 --backend nccl > "$OUT/verify_tp2_bf16.log" 2>&1 &
    p1=$!
    run verify_llama_tp2_bf16 python3 -m hybridpar.models.verify --tp 2 --dtype bf16 --backend nccl --model-name llama-tiny
    wait $p1 && echo "== verify_tp2_bf16: exit 0" | tee -a "$OUT/summary.log" || { echo "== verify_tp2_bf16: FAILED" | tee -a "$OUT/summary.log"; status=1; }
    tail -n 12 "$OUT/verify_tp2_bf16.log" ;;
  verify4)  # a 4-GPU machine (nvidia-h200-x4): TP 4 on qwen2-tiny (4 KV heads), and on qwen2-tiny-copy, whose 2 KV heads it replicates
    run verify_tp4_fp32 python3 -m hybridpar.models.verify --tp 4 --dtype fp32 --backend nccl
    run verify_copy_tp4_fp32 python3 -m hybridpar.models.verify --tp 4 --dtype fp32 --backend nccl --model-name qwen2-tiny-copy
    run verify_tp4_bf16 python3 -m hybridpar.models.verify --tp 4 --dtype bf16 --backend nccl
    run verify_llama_tp4_bf16 python3 -m hybridpar.models.verify --tp 4 --dtype bf16 --backend nccl --model-name llama-tiny
    run verify_tp2_tknp2 python3 -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --backend nccl
    run verify_tp2_tknp2_bf16 python3 -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --dtype bf16 --backend nccl
    run verify_tknp4 python3 -m hybridpar.tknp.verify --token-parallel-size 4 --backend nccl ;;
  labs)
    for lab in labs/*.ipynb; do run "lab_$(basename "$lab" .ipynb)" python3 -m hybridpar.book.run_labs "$lab" --timeout 300; done ;;
  labs_parallel)  # every lab at once (a 2-GPU host has 32 cores); each lab's ranks use both GPUs
    pids=()
    for lab in labs/*.ipynb; do
      name="lab_$(basename "$lab" .ipynb)"
      ( python3 -m hybridpar.book.run_labs "$lab" --timeout 300 > "$OUT/$name.log" 2>&1; rc=$?
        echo "== $name: exit $rc" >> "$OUT/$name.log"; echo "== $name: exit $rc ($SECONDS s)" ) &
      pids+=($!)
    done
    wait "${pids[@]}"
    for lab in labs/*.ipynb; do
      name="lab_$(basename "$lab" .ipynb)"; tail -n 3 "$OUT/$name.log"; tail -n 1 "$OUT/$name.log" >> "$OUT/summary.log"
      grep -q "exit 0$" "$OUT/$name.log" || status=1
    done ;;
  *) echo "unknown check $w"; status=2 ;;
esac; done; done
cat "$OUT/summary.log"
exit $status
