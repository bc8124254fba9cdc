#!/usr/bin/env bash
# The CUDA/NCCL path's check on a machine with one GPU: its tests, then the 1gpu_mnist notebook's `full` set.
#   bash benchmarks/gpu_check.sh DATA_DIR OUT_DIR      (DATA_DIR holds mnist.npz: full MNIST)
# Writes OUT_DIR/gpu.txt (the card), tests.log, report.log and report.tgz (the executed notebook, figures, REPORT.md).
set -u
data_dir=$(realpath "$1"); out=$(realpath "$2"); mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'NCCL', torch.cuda.nccl.version())"
  nproc; } 2>&1 | tee "$out/gpu.txt"
started=$(date +%s)
timeout 150 python3 -m pytest -p no:cacheprovider -o addopts="" tests/test_cuda.py -v -s 2>&1 | tee "$out/tests.log"
echo "tests: $(( $(date +%s) - started )) s" | tee -a "$out/tests.log"
started=$(date +%s)
timeout "${NOTEBOOK_TIMEOUT_S:-400}" python3 -m dynbatch_core report --params full --notebooks 1gpu_mnist \
    --data-dir "$data_dir" --out runs/gpu-full 2>&1 | tee "$out/report.log"
echo "notebook: exit ${PIPESTATUS[0]}, $(( $(date +%s) - started )) s" | tee -a "$out/report.log"
tar czf "$out/report.tgz" -C runs gpu-full 2>/dev/null
