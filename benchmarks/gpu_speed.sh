#!/bin/bash
# Issue 10 (step speed), one call on the GPU machine: the GPU tests of the speed levers, the diffusers
# baseline, then benchmarks/gpu_step_speed.py (self-test, every variant, both shapes). Needs, carried
# (git-ignored): .whl/ (wheels: diffusers, optimum-quanto, pydantic(+core), json5, pandera, ...) and
# .bench/diffusers_lora_baseline.py. Logs and gpu_step_speed.json go to $OUT; the tables print last.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -f .speedcache/inductor.tgz ] && tar xzf .speedcache/inductor.tgz -C / && echo "inductor cache restored"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
start=$SECONDS
timeout ${TESTS_S:-90} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_speed_levers.py tests/gpu/test_fp8_linear.py -s > $OUT/tests.log 2>&1
echo "tests: $((SECONDS - start)) s"; start=$SECONDS
CASES=bf16_ckpt SHAPES=${SHAPES:-1x1300,3x300} STEPS=4 timeout ${BASELINE_S:-120} python3 .bench/diffusers_lora_baseline.py > $OUT/baseline.log 2>&1
echo "baseline: $((SECONDS - start)) s"; start=$SECONDS
timeout ${SPEED_S:-360} python3 benchmarks/gpu_step_speed.py > $OUT/speed.log 2>&1
echo "speed: $((SECONDS - start)) s (exit $?)"
tar czf $OUT/inductor.tgz /tmp/torchinductor_root 2>/dev/null; ls -la $OUT/inductor.tgz | awk '{print "inductor cache", $5}'
grep -E "passed|failed|Error|error" $OUT/tests.log | tail -4
grep -E "^bf16_ckpt|^case" $OUT/baseline.log
grep -iE "Traceback|Error" $OUT/speed.log | grep -v Warning | head -5
sed -n '/^variant | shape/,$p' $OUT/speed.log; grep "^equal-results\|TFLOP" $OUT/speed.log
