#!/usr/bin/env bash
# Every GPU test and measurement padfree owes, for a lent CUDA machine (no venv there: the image's own torch,
# triton and transformers are used; padfree is installed without dependencies).
#
#   benchmarks/gpu_all.sh OUT_DIR [STAGE ...]      STAGE: tests w1 kernels graphs (default: all four)
#
# Each stage fits in one device call of at most 10 minutes; results land in OUT_DIR named after the GPU
# (e.g. h100-w1.json), ready to be copied to benchmarks/results/ as produced.
set -u
out=${1:?usage: benchmarks/gpu_all.sh OUT_DIR [tests|w1|kernels|graphs ...]}
shift
stages=${*:-tests w1 kernels graphs}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PADFREE_GIT_REV=${PADFREE_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q -e . --no-deps --no-build-isolation >/dev/null 2>&1 || export PYTHONPATH=$PWD
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.split()[-1].lower())")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/$gpu-device.txt"
for stage in $stages; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    tests)   python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_ops.py \
               tests/test_families.py tests/test_buckets.py 2>&1 | tail -25 | tee "$out/$gpu-tests.txt" ;;
    w1)      python3 -m padfree.cli bench --device cuda --dtype fp16,bf16 --workload w1 --batch 16 \
               --max-len 64,128,256,384,512,768,1024 --json "$out/$gpu-w1.json" --markdown "$out/$gpu-w1.md" ;;
    kernels) python3 benchmarks/gpu_kernels.py "$out/$gpu-kernels.json" --md "$out/$gpu-kernels.md" --skip-tests ;;
    graphs)  python3 benchmarks/gpu_graphs.py --json "$out/$gpu-graphs.json" --markdown "$out/$gpu-graphs.md" ;;
    *)       echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
