#!/usr/bin/env bash
# Runs the December 2026 audit's reproduction scripts from the project root and prints each one's output under a
# header (the closing notes' before/after lines). The scripts are not part of the project: pass their folder.
#     bash tools/audit_repro.sh PATH/TO/audit-repro > outputs/audit-2026-12/after.txt
# Needs the project importable (the venv of .ci/run, or `pip install -e .`); scratch files go to audit-scratch/.
# The scripts import the flat module paths and field names of before the move to subpackages (batching/, engine/,
# study/): run this in a worktree of commit 4744859, where outputs/audit-2026-12/after.txt was captured:
#     git worktree add /tmp/audit 4744859 && bash /tmp/audit/tools/audit_repro.sh PATH/TO/audit-repro
set -uo pipefail
cd "$(dirname "$0")/.."
repro=${1:?usage: bash tools/audit_repro.sh PATH/TO/audit-repro}
export PYTHONPATH=.
quiet() { grep -v -e Warning -e 'warn(' -e '^ *$' -e 'Profiler record function' | tail -"${TAIL:-12}"; }
run() { echo "=== $*"; timeout 300 "$@" 2>&1 | quiet; }
two_ranks() { echo "=== $1 (2 ranks)"; (timeout 120 python "$repro/$1" 0 & timeout 120 python "$repro/$1" 1; wait) 2>&1 | quiet; }

run python "$repro/nan_poison.py"
run python "$repro/fp16_dbg.py"
run python "$repro/inproc_gain.py"
run python "$repro/inproc.py" adascale
run python "$repro/inproc.py" warmup
run python "$repro/halves_bn.py"
rm -rf audit-scratch/elastic; two_ranks elastic_same_step.py
run python "$repro/empty_slice.py"
echo "=== torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --batch-size 37 --workers 2 --epochs 1"
timeout 200 torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --batch-size 37 --workers 2 --epochs 1 2>&1 \
    | grep -E "IndexError|^epoch|rank.\]: [A-Za-z]*Error" | head -5
echo "exit ${PIPESTATUS[0]}"
echo "=== multinode_gpu.py (RANK=0 WORLD_SIZE=2 LOCAL_WORLD_SIZE=1 TORCHELASTIC_RUN_ID=x)"
RANK=0 WORLD_SIZE=2 LOCAL_WORLD_SIZE=1 TORCHELASTIC_RUN_ID=x python "$repro/multinode_gpu.py" 2>&1 | quiet
run python "$repro/compile_hook.py" ddp_optimizer 29701
run python "$repro/compile_hook.py" python_reducer 29702
run python "$repro/compile_buckets.py"
two_ranks compile2.py
run python "$repro/inorder.py"
# prefetch_depth now takes the loader itself (the depth can no longer be given apart from the loader's options):
# the same script with the depth of 2 workers written out, to reach its in_order=False loader
mkdir -p audit-scratch && sed 's/prefetch_depth(2)/4/' "$repro/inorder.py" > audit-scratch/inorder_depth_4.py
run python audit-scratch/inorder_depth_4.py
run python "$repro/unused_param.py"
run python "$repro/rngdraw.py"
run python "$repro/minmax.py"
TAIL=8 run python "$repro/mc_noise.py"
