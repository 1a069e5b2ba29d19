#!/bin/bash
# Issue 12: pretraining budgets for the demo's base model, side by side on one GPU (benchmarks/gpu_demo_pretrain.py).
# Carry .whl (benchmarks/fetch_wheels.sh). Each line of CONFIGS: prepared-folder name then --set overrides.
# CPU smoke: SMOKE=1 PY=.venv/bin/python OUT=/tmp/out12 bash benchmarks/gpu_demo_pretrain.sh
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=${D:-/tmp/demo_pretrain}
if [ -z "$SMOKE" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:.
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  PAIRS=${PAIRS:-3200}
else
  export PYTHONPATH=.
  PAIRS=16; SMOKE_SET="--set vae_steps=3 --set transformer_steps=2"; LORA="--lora-steps 1,2 --guidance 1,4"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
while read -r folder sets; do
  [ -z "$folder" ] && continue
  $PY benchmarks/gpu_demo_pretrain.py prepare "$D/$folder" --set pairs=$PAIRS $sets $SMOKE_SET > "$OUT/prepare_$folder.log" 2>&1 &
done <<< "${PREPARE:-A
B --set kinds=move,remove,background}"
wait
for f in "$OUT"/prepare_*.log; do echo "$f: $(grep -E 'vae:|encoded|Error' "$f" | tr '\n' ' ')"; done
while read -r name folder sets; do
  [ -z "$name" ] && continue
  timeout ${T:-360} $PY benchmarks/gpu_demo_pretrain.py train "$D/$folder" "$name" $sets $SMOKE_SET ${LORA:-} > "$OUT/$name.log" 2>&1 &
done <<< "$CONFIGS"
wait
for d in "$D"/*/; do for f in "$d"*.json "$d"*.png; do [ -e "$f" ] && cp "$f" "$OUT/$(basename "$d")_$(basename "$f")"; done; done
for f in "$OUT"/*.log; do grep -l "Traceback" "$f" >/dev/null && { echo "== $f"; grep -A2 -E "Error" "$f" | tail -4; }; done
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*prepare.json")):
    print(f, f.read_text())
fmt = lambda m: f"{m['psnr']:.1f}/{m['edit_success']:.1f}/{m['preservation']:.1f}/{m['latent_mse']:.3f}"
print("\nname g | s | base kinds psnr | recolour base psnr/edit/pres/latent_mse | lora@steps")
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    if "recolour_base" not in r:
        continue
    for g, base in r["recolour_base"].items():
        kinds = " ".join(f"{k[:3]}{v['psnr']:.1f}" for k, v in r["base_kinds"][g].items() if k != "recolour")
        lora = " ".join(f"@{s}:{fmt(m[g])}" for s, m in r["recolour_lora"].items())
        print(f"{r['name']} g{g} | {r['pretrain_s']:.0f} | {kinds} | {fmt(base)} | {lora}")
PYEOF
