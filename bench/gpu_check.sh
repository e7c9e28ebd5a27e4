#!/bin/bash
# One GPU check for a GPU machine lent for minutes (issue 18): Atari teacher training, student training
# fed from HDF5 and recording, each against a limit measured in the same run; the DQN update and the
# student's in bf16 autocast and channels-last against fp32; recording with the teacher in one lane
# against the inference server feeding four. Ends within 6 minutes: every step's time limit is cut to
# what is left of a 345-second budget (the issue's bound, less the set-up), and a step with under 20 s
# left is skipped and named.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log   # through the device tool: the whole log back
#   QUICK=1 bash bench/gpu_check.sh    # the same steps on MinAtar, short: to try the script on a CPU
#   BUDGET_S=200 bash bench/gpu_check.sh   # a shorter budget than 345 s (steps left without time are skipped)
#
# A bare machine is expected: python3 with torch, h5py, einops and numpy, without gymnasium, ale-py,
# minatar or tqdm. Those come from wheels placed beside the repo in .whl/ (see
# docs/performance.md#gpus for the pip download line) and are installed with --no-index into /tmp/site;
# the interpreter is then called through a wrapper script (a symlink to a virtualenv's python would
# lose the virtualenv). Every import is probed first and every step runs under `timeout`, printing as
# it goes; a step that fails or runs out of time is reported and the next one runs.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-345}))
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
PY=${PYTHON:-python3}
RAN=(); SKIPPED=()

if ls .whl/*.whl >/dev/null 2>&1; then
  # one wheel at a time: pip refuses a whole list for one wheel built for another Python (ale-py's
  # are per version, cp310-cp313 sit in .whl/), and the others must still go in
  say "installing wheels from .whl/ into /tmp/site"
  for w in .whl/*.whl; do
    timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w" >/dev/null 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then say "  $(basename "$w"): installed"; else say "  $(basename "$w"): not installed (rc $rc; another Python's?)"; fi
  done
fi
cat > /tmp/gpu_check_python <<WRAP
#!/bin/bash
export PYTHONPATH=/tmp/site:$(pwd)\${PYTHONPATH:+:\$PYTHONPATH} PYTHONUNBUFFERED=1
exec $(command -v $PY) "\$@"
WRAP
chmod +x /tmp/gpu_check_python
P=/tmp/gpu_check_python

missing=()
for mod in torch numpy h5py einops tqdm gymnasium ale_py minatar; do
  if timeout 90 $P -c "import $mod" >/dev/null 2>&1; then say "import $mod: ok"; else say "import $mod: MISSING"; missing+=($mod); fi
done
# wandb is not needed by the benchmarks (tracking is off in them), and its own needs (pydantic,
# opentelemetry, ...) are not in the GPU image: probed only to say whether training runs could track.
if timeout 90 $P -c "import wandb" >/dev/null 2>&1; then say "import wandb: ok"; else say "import wandb: missing (not needed here)"; fi
DEVICE=$(timeout 90 $P -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
say "device: $DEVICE; $(timeout 60 $P -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)"
command -v nvidia-smi >/dev/null && say "nvidia-smi: $(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
say "$(nproc) CPU cores, date $(date -u +%Y-%m-%d)"

has() { for m in "$@"; do [[ " ${missing[*]} " == *" $m "* ]] && return 1; done; return 0; }
run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  local left=$((DEADLINE - $(date +%s) - 5))  # 5 s for --kill-after
  if [ $left -lt 20 ]; then say "$name: skipped, ${left}s left of the budget"; SKIPPED+=("$name (no time left)"); return; fi
  [ $limit -gt $left ] && limit=$left
  say "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@"; local rc=$?
  if [ $rc -eq 0 ]; then RAN+=("$name"); else say "$name: failed or out of time (rc $rc)"; SKIPPED+=("$name (rc $rc)"); fi
}

if [ "${QUICK:-0}" = 1 ]; then SUITE=minatar; T=2; STEPS=20000; else SUITE=atari; T=8; STEPS=20000; fi
if has torch numpy tqdm gymnasium ale_py minatar; then
  run 130 "teacher training ($SUITE)" $P bench/teacher_throughput.py --suite $SUITE --seconds $T --device $DEVICE --layouts
  run 110 "student from HDF5 ($SUITE)" $P bench/student_bench.py --suite $SUITE --seconds $((T * 3 / 4)) --device $DEVICE --layouts
  run 90 "recording ($SUITE)" $P bench/dataset_bench.py --suite $SUITE --steps $STEPS --rounds 1 --seconds 2 \
      --device $DEVICE --no-reading --inference lanes server --lanes 4
else
  SKIPPED+=("every bench: missing ${missing[*]}")
fi
say "ran: ${RAN[*]:-nothing}"
say "skipped: ${SKIPPED[*]:-nothing}"
