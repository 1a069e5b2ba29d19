#!/bin/bash
# GPU checks (tests/gpu) + the shipped int8 24 GB configuration beside the baseline, one call.
# Needs, carried to the GPU machine (git-ignored): .whl/ (wheels of diffusers, optimum-quanto, pydantic,
# json5, pandera, dagster-pipes, bitsandbytes and their missing dependencies) and
# .bench/diffusers_lora_baseline.py (a copy of ../shared/bench/diffusers_lora_baseline.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu -s 2>&1 | grep -v Warn | tail -6
CASES=int8_ckpt SHAPES=1x1300 STEPS=6 timeout 150 python3 .bench/diffusers_lora_baseline.py > $OUT/baseline.log 2>&1
EXPANDABLE=1 PRECISION=int8-quanto VARIANTS=plain,act+opt SHAPES=1x1300 STEPS=6 timeout 220 python3 benchmarks/gpu_train_step.py > $OUT/ours.log 2>&1
for f in baseline ours; do echo "=== $f"; grep -i "error\|self-test\|selftest\|identical" $OUT/$f.log | tail -3; grep "^case \|^int8_ckpt \|^qwen-edit " $OUT/$f.log; done
