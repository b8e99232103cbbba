#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py): one table of tokens/s, MFU,
# peak memory and the memory estimate's error, in under 8 minutes on one GPU.
#
#   bash benchmarks/fetch_gpu_wheels.sh        # here, with network: the packages that travel -> .whl/
#   bash benchmarks/gpu_check.sh               # there: installs .whl/*.whl (no network), runs the checks
#   bash benchmarks/gpu_check.sh --dry-run     # anywhere: the same plumbing on CPU with the tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
# The carried wheels, where the packages are missing (a machine with them installed keeps its own).
have_all() {  # every package the wheels carry, found without importing it
  python3 -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" \
    trl datasets hydra liger_kernel cut_cross_entropy
}
if compgen -G ".whl/*.whl" > /dev/null && ! have_all 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec python3 benchmarks/gpu_check.py "$@"
