#!/usr/bin/env bash
# Wheels for a GPU machine without network that has torch, transformers, peft,
# accelerate, triton and pyarrow (see gpu_check.sh): what fttrain's GPU check
# needs besides, pinned to the versions this checkout is tested with, into .whl/
# (ignored by git; carried to the machine: `carry: [".whl"]`). About 48 MiB with
# bitsandbytes (43 MiB of it), under the 64 MiB a call may carry with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$@"
}
v() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in trl datasets hydra-core omegaconf antlr4-python3-runtime dill multiprocess xxhash fsspec deepspeed hjson \
           pydantic pydantic-core annotated-types typing-inspection \
           bitsandbytes; do
  # A package published as source only (DeepSpeed, antlr4's runtime): its pure-Python wheel built here
  # (DeepSpeed's ops compile on first use there).
  get "$pkg==$(v $pkg)" 2>/dev/null || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl "$pkg==$(v $pkg)"
done
# Liger-Kernel and cut-cross-entropy (pure Python over the machine's triton; not installed here,
# so pinned by name).
get "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
du -sh .whl
