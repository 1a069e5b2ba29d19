#!/bin/bash
# Recreates the git-ignored .whl/ and .bench/ that the GPU scripts (gpu_issue11_rest.sh, gpu_checks.sh, ...) carry:
# the GPU machine has no network, so the packages the trainer's import path needs and the machine lacks travel
# as wheels for its Python (3.12, manylinux x86_64), installed there with `pip install --no-index --no-deps --target`.
# Versions come from requirements.lock. Why these names: the machine already has torch, transformers, peft,
# accelerate, numpy, pandas, huggingface_hub, safetensors, typing-inspect, mypy-extensions, zipp, ...
# (/work/.library/device/KINDS.md); this is what `qwen-edit check` / `train` / validation import beyond that
# (with report_to none: no mlflow), and the Requires-Dist of these wheels that the machine lacks.
# typing_extensions is there too, in a version not recorded: pydantic 2.14 asks for >= 4.16, so it travels
# (a newer one only adds names).
# bitsandbytes (~60 MiB) only with BNB=1: only the nf4 / adamw8bit paths (tests/gpu/test_bnb*) import it.
# Usage: bash benchmarks/fetch_wheels.sh   (from the repository root; about 8 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="diffusers importlib_metadata optimum-quanto pydantic pydantic_core annotated-types typing-inspection
json5 pandera typeguard dagster-pipes typing_extensions"
[ -n "${BNB:-}" ] && PACKAGES="$PACKAGES bitsandbytes"
PLATFORMS="manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
manylinux_2_5_x86_64 manylinux1_x86_64"
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done

# one version of each: start from an empty folder
rm -rf .whl && mkdir -p .whl .bench
for name in $PACKAGES; do
  # the lock spells names as PyPI does; compare them with - and _ alike, case ignored
  pattern=$(echo "$name" | sed 's/[-_]/[-_]/g')
  pin=$(grep -i -E "^${pattern}==" requirements.lock | head -1)
  if [ -z "$pin" ]; then
    echo "fetch_wheels: $name is not in requirements.lock" >&2
    exit 1
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d .whl "$pin" 2>&1 | { grep -v "^WARNING: Location" || true; }  # pip.conf's absent local indexes
done
cp ../shared/bench/diffusers_lora_baseline.py .bench/
ls .whl
du -sh .whl .bench
