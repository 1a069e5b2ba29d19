#!/usr/bin/env bash
# The Debian packages the integration tests need (headless Chromium + chromedriver for the browser
# test of the Dagster UI, the PostgreSQL server for the instance-storage / MLflow-backend profile).
# Installs only what is missing; where it cannot (not root and no password-less sudo) it stops at
# once with the one command to run, instead of letting the tests fail later.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
((${#missing[@]})) || exit 0

install=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "make test needs the system packages ${missing[*]}; install them once with:" >&2
  echo "  sudo apt-get update && sudo ${install[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "make test needs ${missing[*]} (Debian/Ubuntu package names); install them with your system's package manager" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
