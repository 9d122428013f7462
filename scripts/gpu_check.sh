#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one command for a lent GPU machine (issue 18; docs/benchmarks.md,
# "GPU merges"): the device tests (a real CUDA merge against the CPU's, every rule), a CUDA training
# run (`mergecl run digits`: bf16 autocast, merges, evaluation), `--nproc 2` (two GPUs, or on one
# GPU a one-line refusal), and the GPU merge benchmark with its
# tolerance check. Each step's output is also written under $OUT (default ./gpu-check), and each step
# has a time limit, so that what ran comes back even if a later step runs long (about 8 minutes in
# all on one GPU and 16 cores; the benchmark's models are built first, ~1 minute).
#
# mergecl runs from this checkout (PYTHONPATH=src), on the machine's own torch. Packages that machine
# lacks travel as wheels in .whl/ (ignored by git), installed first when present. For a Python 3.12
# machine without pydantic, made here before the run:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-check-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MERGECL_QUIET=1

python3 -c "import sys, mergecl, torch
torch.cuda.is_available() or sys.exit(f'gpu_check: no CUDA device here (torch {torch.__version__})')
print('torch', torch.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.log" || exit 1
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, keep its output, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || { echo "== $name FAILED (${PIPESTATUS[0]})"; status=1; }
}
step device-tests 120 python3 -m pytest -q -p no:cacheprovider tests/merging/test_merging_device.py
rm -rf /tmp/gpu-check-digits  # this script's own, from an earlier call on the same machine
step digits 150 python3 -m mergecl run digits --out /tmp/gpu-check-digits --quiet
cp /tmp/gpu-check-digits/results.json "$out/digits-results.json" 2>/dev/null
# --nproc 2: two processes on two GPUs, or on one GPU a one-line refusal (exit 2), not a traceback
rm -rf /tmp/gpu-check-nproc
step nproc 150 bash -c 'said=$(python3 -m mergecl run digits --nproc 2 --out /tmp/gpu-check-nproc --quiet 2>&1); rc=$?
    echo "$said"; [ "$(python3 -c "import torch; print(torch.cuda.device_count())")" -ge 2 ] && exit $rc
    [ $rc -eq 2 ] && [ "$(echo "$said" | wc -l)" -eq 1 ] && echo "$said" | grep -q "CUDA device(s), one per process"'
step gpu-merge 360 python3 benchmarks/gpu_merge.py --out /tmp/gpu-check-merge --check --repeats 2
exit $status
