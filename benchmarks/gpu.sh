#!/usr/bin/env bash
# Everything docs/performance.md still lacks a GPU for, in one command on a machine with one CUDA GPU
# (H100/H200 class) that already has torch, transformers, timm, peft, pluggy, typer, rich, torchaudio
# and setuptools installed, and no network:
#
#     bash benchmarks/gpu.sh OUTDIR        # about 10 minutes on an H100
#
# It installs mmcore and the four plugins in place (no dependencies, no downloads), then runs:
#   1. the tests that only run on a GPU, and the model/merge tests on CUDA-capable torch;
#   2. `mmcore test-run` of a tiny CLIP + Whisper + Llama on CUDA in bf16;
#   3. bench_merge at the full size (hidden 4096), bf16: CUDA's own sync count for each pass;
#   4. bench_model at full size (CLIP ViT-L/14-336 + Llama-3-8B architecture, random weights, bf16,
#      SDPA): step vs HF Llava, CUDA peak memory, decode, concurrent encoder streams, align MFU;
#   5. bench_packing on the LLaVA-instruct-like mix with a 1.2B-parameter language model (24 x 2048),
#      bf16 autocast, SDPA: padded, length-grouped and packed batches, samples/s and MFU each.
# Results land in OUTDIR as JSON and logs (at most 8 files).
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())"
pip install -q --no-deps --no-build-isolation -e . plugins/clip plugins/siglip plugins/eva02 plugins/whisper
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1 || true
python -m pytest -q -p no:cacheprovider plugins/whisper/tests tests/test_merge.py tests/test_model.py \
    tests/test_generation.py > "$out/tests.log" 2>&1 || echo "tests failed: see $out/tests.log"
model=$(mktemp -d)/tiny
mmcore assemble --encoder vision=clip:preset=tiny --encoder audio=whisper:preset=tiny --llm tiny \
    --projector mlp2x_gelu --random-init -o "$model" > /dev/null
mmcore test-run "$model" --device cuda --dtype bf16 --batch-size 8 --steps 5 --generate 32 --json \
    > "$out/test-run-cuda.json" || echo "test-run failed: see $out/test-run-cuda.json"
python benchmarks/bench_merge.py --device cuda --hidden 4096 --dtype bf16 --json "$out/merge-gpu.json" \
    > "$out/bench-gpu.log" 2>&1
python benchmarks/bench_packing.py --device cuda --dtype bf16 --hidden 2048 --layers 24 --heads 16 \
    --samples 384 --batch 16 --pack-to 2048 --packed-groups none --repeats 3 --json "$out/packing-gpu.json" \
    >> "$out/bench-gpu.log" 2>&1 || echo "bench_packing failed: see $out/bench-gpu.log"
python benchmarks/bench_model.py --device cuda --size full --dtype bf16 --json "$out/model-gpu.json" \
    > "$out/model-gpu.log" 2>&1
tail -n 30 "$out/model-gpu.log"
