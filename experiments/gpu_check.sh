#!/usr/bin/env bash
# GPU check: fljax's benchmark workloads on one GPU, from a fresh machine that has nothing but
# this repository and Python 3.11+ (about 8 minutes with the installation).
#
#   bash experiments/gpu_check.sh            # install, then run on the GPU
#   bash experiments/gpu_check.sh --dry-run  # the same sequence on CPU at tiny sizes (< 60 s)
#
# 1. Installation (not in --dry-run): a virtual environment in .venv-gpu (or $GPU_VENV) with
#    fljax and its "bench" extra (PyTorch from the package index), then jax's CUDA plugin for the
#    CUDA major version of that PyTorch build (jax[cuda12] or jax[cuda13], the jax version fljax
#    resolved), so both use one set of NVIDIA libraries. It stops if jax does not see a GPU.
# 2. seed_cifar (experiments/bench_round.py): the plain FedAvg round at cohorts 10, 100 and 1,000
#    (LeNet, 500 examples per client), the hardware bound (the CNN trained centrally) and the
#    plain sequential PyTorch loop (experiments/torch_reference.py) measured in the same run.
#    Both workloads' PyTorch loops run on the GPU: the script sets TORCH_REFERENCE_DEVICE=cuda
#    (torch_reference.py's device; cpu in --dry-run).
# 3. many_small (experiments/bench_data.py) at cohort 10,000: size buckets over 10,000
#    heavy-tailed clients, then the whole population as one jitted round.
# 4. shakespeare_lstm (experiments/bench_lstm.py) at cohort 100: the char-LSTM round (fused
#    recurrence, size buckets) beside the PyTorch loop (nn.LSTM) over the same clients.
#
# Prints the benchmarks' JSON lines (fields: ../shared/BENCHMARKS.md) between a first line
# {"bench": "gpu_check", "stage": "start", ...} and a last line {"bench": "gpu_check",
# "stage": "done", "elapsed_sec": ..., "within_budget": ...}; exits non-zero if any stage fails.
# --dry-run uses the Python in $PYTHON (default .venv/bin/python, else python3) with JAX_PLATFORMS=cpu,
# installs nothing, and runs the same stages at tiny sizes: cohorts of 2 and 16 clients (the LSTM
# with 16 units on sequences of 8).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
budget_sec=480  # 8 minutes, installation included
SECONDS=0

if [[ $dry_run == 1 ]]; then
  py="${PYTHON:-}"
  if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
  fi
  export JAX_PLATFORMS=cpu
  budget_sec=60
  round_args=(--quick --variants plain,dp_secagg)  # cohort 2 of 16x16 images, one round
  data_args=(--quick --cohorts 16 --rounds 1 --num-buckets 2)
  lstm_args=(--quick)  # cohort 2, LSTM 2x16, sequences of 8, one round
  export TORCH_REFERENCE_DEVICE=cpu
else
  venv="${GPU_VENV:-.venv-gpu}"
  python3 -m venv "$venv"
  py="$venv/bin/python"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -e ".[bench]"
  cuda_major=$("$py" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
  jax_version=$("$py" -c 'import jax; print(jax.__version__)')
  "$py" -m pip install -q "jax[cuda${cuda_major}]==${jax_version}"
  "$py" -c 'import jax; assert jax.default_backend() == "gpu", f"jax sees no GPU: {jax.devices()}"'
  round_args=(--cohorts 10,100,1000 --rounds 1 --variants plain)
  data_args=(--cohorts 10000 --rounds 1)
  lstm_args=(--cohorts 100 --rounds 1)
  export TORCH_REFERENCE_DEVICE=cuda
fi

"$py" - "$dry_run" <<'EOF'
import json, platform, sys
import jax
try:
    import torch
    torch_info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
except ImportError:
    torch_info = {"torch": None}
print(json.dumps({"bench": "gpu_check", "stage": "start", "dry_run": sys.argv[1] == "1",
                  "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                  "jax": jax.__version__, "python": platform.python_version(), **torch_info}), flush=True)
EOF

"$py" experiments/bench_round.py "${round_args[@]}"
"$py" experiments/bench_data.py "${data_args[@]}"
"$py" experiments/bench_lstm.py "${lstm_args[@]}"

within=false
if ((SECONDS <= budget_sec)); then within=true; fi
echo "{\"bench\": \"gpu_check\", \"stage\": \"done\", \"dry_run\": $([[ $dry_run == 1 ]] && echo true || echo false), \"elapsed_sec\": $SECONDS, \"budget_sec\": $budget_sec, \"within_budget\": $within}"
