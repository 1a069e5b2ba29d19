#!/bin/bash
# Issue 11 (memory) in one call on the GPU machine: block swap's GPU tests, the diffusers int8 baseline,
# then benchmarks/gpu_memory.py per card size (24 / 16 / 12 GB caps) and flavour shape.
# Needs, carried (git-ignored): .whl/ (diffusers, optimum-quanto, pydantic, json5, pandera, dagster-pipes,
# bitsandbytes, ... wheels for Python 3.12) and .bench/diffusers_lora_baseline.py.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_S:-110} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_block_swap.py -x > "$OUT/tests_gpu.log" 2>&1
  echo "tests/gpu/test_block_swap.py: $(tail -1 "$OUT/tests_gpu.log")"
fi
# does anything the training entry point imports start CUDA before the recipe asks for expandable segments?
python3 -c "import torch, trainer.train, trainer.training.recipe, optimum.quanto, bitsandbytes; print('CUDA started by imports:', torch.cuda.is_initialized())" 2>&1 | tail -1
CASES=int8_ckpt SHAPES=${BASELINE_SHAPES:-1x1300,3x300} STEPS=5 timeout ${BASELINE_S:-110} python3 .bench/diffusers_lora_baseline.py > "$OUT/baseline.log" 2>&1
PYTORCH_CUDA_ALLOC_CONF=${ALLOC_CONF-expandable_segments:True} LOAD=${LOAD:-42:12} CASES=${CASES_MEM:-int8:0:-:1x1300,int8:0:-:3x300,int8:0:24:1x1300,int8:0:24:3x300,int8:12:24:1x1300,int8:12:24:3x300,int8:28:16:1x1300,int8:42:12:1x1300,nf4:0:16:1x1300,nf4:24:12:1x1300} \
  timeout ${MEMORY_S:-330} python3 benchmarks/gpu_memory.py > "$OUT/memory.log" 2>&1
echo "=== baseline"; grep "^int8_ckpt \|Error\|error" "$OUT/baseline.log" | tail -4
echo "=== qwen-edit memory"; grep -i "traceback\|error" "$OUT/memory.log" | head -5; sed -n '/^case |/,$p' "$OUT/memory.log"; grep "H2D" "$OUT/memory.log"
grep -o '"cuda_initialised_before_allocator_setting": [a-z]*\|"expandable_segments_active": [a-z]*' "$OUT/memory.log"
