#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call, on a machine with a CUDA GPU whose python3 already
# holds PyTorch (a lent device machine, a lab's GPU box). Nothing is installed; the figures and the log
# land in $OUT (a device call's folder that comes back) or bench/out/.
#
# The corpus is read from $BENCH_CORPUS. A device machine gets only the repository, so copy the corpus
# into an ignored folder first and carry it:
#   mkdir -p .devdata && cp ../shared/data/tinyshakespeare.txt .devdata/ && echo /.devdata/ >> .git/info/exclude
#   run(command="BENCH_CORPUS=.devdata/tinyshakespeare.txt bash scripts/gpu_bench.sh", carry=[".devdata"])
# Extra arguments go to `python -m bench.gpu` (for example --seeds 1337 --parts quality to fit a short lease).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -m bench.gpu --results "$out/gpu.md" "$@" 2>&1 | tee "$out/gpu.log"
