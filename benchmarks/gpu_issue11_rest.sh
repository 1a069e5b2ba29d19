#!/bin/bash
# Issue 11, items 3 and 4, in one call on the GPU machine (about 6 minutes, 9 at most): the GPU cache test, the
# diffusers int8 baseline, the cache stage's rate beside the bare encoders' (benchmarks/gpu_cache_speed.py: full-size
# random Qwen2.5-VL-7B and VAE) and qwen-edit end to end on a real-width shallow pipeline
# (benchmarks/gpu_end_to_end.py: check, cache, train through accelerate launch, validate). Logs and JSON
# under $OUT, a short table last.
# Needs, carried (git-ignored): .whl/ (diffusers, optimum-quanto, pydantic, json5, pandera, dagster-pipes, ... wheels
# for Python 3.12) and .bench/diffusers_lora_baseline.py, both made by `bash benchmarks/fetch_wheels.sh`.
# CPU smoke (no wheels, no baseline, the tiny models): TINY=1 PY=.venv/bin/python OUT=/tmp/out bash benchmarks/gpu_issue11_rest.sh
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "$TINY" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:.
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the trainer never imports dagster; the VL processor of transformers 5 needs torchvision
$PY -c "import sys, trainer.cli, trainer.train, trainer.cache; print('trainer imports dagster:', 'dagster' in sys.modules)" 2>&1 | tail -1
$PY -c "import torchvision, transformers, torch; print('torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
if [ -z "$TINY" ]; then
  timeout ${TEST_S:-50} $PY -m pytest -q -p no:cacheprovider tests/gpu/test_cache_speed.py -x > "$OUT/tests_gpu.log" 2>&1
  echo "tests/gpu/test_cache_speed.py: $(tail -1 "$OUT/tests_gpu.log")"
  CASES=int8_ckpt SHAPES=1x1300 STEPS=4 timeout ${BASELINE_S:-110} $PY .bench/diffusers_lora_baseline.py > "$OUT/baseline.log" 2>&1
  echo "baseline: exit $?"
fi
timeout ${CACHE_S:-130} $PY benchmarks/gpu_cache_speed.py > "$OUT/cache_speed.log" 2>&1; echo "cache speed: exit $?"
timeout ${E2E_S:-240} $PY benchmarks/gpu_end_to_end.py > "$OUT/end_to_end.log" 2>&1; echo "end to end: exit $?"
for f in cache_speed end_to_end; do grep -i "traceback\|error" "$OUT/$f.log" | grep -v "Warning" | head -3; done
echo "=== baseline"; grep "^int8_ckpt " "$OUT/baseline.log" 2>/dev/null | tail -2
echo "=== cache stage"; sed -n '/^pass | s |/,$p' "$OUT/cache_speed.log"; grep "prompt .* tokens" "$OUT/cache_speed.log"
echo "=== end to end"; sed -n '/^blocks | cache/,$p' "$OUT/end_to_end.log"
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def read(name):
    try:
        return json.loads((out / name).read_text())
    except Exception:
        return None
base, cache, e2e = read("gpu_baseline.json"), read("gpu_cache_speed.json"), read("gpu_end_to_end.json")
step = None
if base:
    for r in base["results"]:
        if r.get("case") == "int8_ckpt" and "ref1_T1300" in r and not r["ref1_T1300"].get("oom"):
            step = r["ref1_T1300"]["s_per_step_median"]
print("\n=== issue 11 items 3-4 | figure")
print(f"baseline int8_ckpt 1x1300 s/step | {step if step is None else round(step, 2)}")
if cache:
    s = cache["summary"]
    print(f"cache s/pair: GPU-bound / before / default / batched | {s['bare_s_per_pair']:.3f} / {s['cache_s_per_pair_before']:.3f} / "
          f"{s['cache_s_per_pair_default']:.3f} / {s['cache_s_per_pair_batched']:.3f}")
    print(f"cache fraction of GPU-bound: default / batched / before (goal 80%) | {s['fraction_of_gpu_bound_default']:.1%} / "
          f"{s['fraction_of_gpu_bound_batched']:.1%} / {s['fraction_of_gpu_bound_before']:.1%}")
if e2e:
    rows, s = e2e["rows"], e2e["summary"]
    first = next(iter(rows.values()))
    print(f"e2e cache s/pair (after loading) | {first['cache_s_per_pair'] or 0:.3f} ({first['cache_s_per_pair_after_loading'] or 0:.3f})")
    for blocks, r in rows.items():
        print(f"e2e {blocks} blocks: s/step, validation s/edit, peak reserved train/validation GiB | {r['s_per_step']} , "
              f"{r['validation_s_per_edit']:.3f} , {r['train_peak_GiB'].get('train', {}).get('reserved')} / {r['validation_peak_GiB'].get('reserved')}")
    if s.get("step_60_blocks_s") is not None:
        ratio = f" ({s['step_60_blocks_s'] / step:.2f}x the baseline)" if step else ""
        print(f"e2e extrapolated to 60 blocks: s/step, validation s/edit | {s['step_60_blocks_s']:.2f}{ratio} , {s['validation_edit_60_blocks_s']:.2f}")
EOF
