#!/usr/bin/env bash
# One command for a contributor with a CUDA GPU: the device, the test suite, a 180-s training run on
# raw Tiny Shakespeare with its summary numbers, and the generation benchmark. Offline: it reads the
# text from data/shakespeare.txt, or from ../shared/data/tinyshakespeare.txt beside the project, or
# from $TINYLLM_DATA. Needs only a CUDA build of PyTorch with numpy and tqdm (pytest and hypothesis
# for the suite, which is skipped with a note where they are missing). 6 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python || command -v python3)}"
out="${GPU_CHECK_OUT:-out/gpu_check}"

echo "== device"
"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible to PyTorch"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}")' || exit 1

data=""
for candidate in "${TINYLLM_DATA:-}" data/shakespeare.txt ../shared/data/tinyshakespeare.txt; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then data="$candidate"; break; fi
done
if [ -z "$data" ]; then
    echo "error: no Tiny Shakespeare text found; put it at data/shakespeare.txt or set TINYLLM_DATA" >&2
    exit 2
fi

echo "== test suite"
if [ "${GPU_CHECK_SUITE:-1}" = 0 ]; then  # for a second run that tries a variant
    echo "skipped: GPU_CHECK_SUITE=0"
    suite=0
elif "$python" -c 'import pytest, hypothesis' 2>/dev/null; then
    "$python" -m pytest -p no:warnings -rs  # quiet already (setup.cfg); once more would hide the count
    suite=$?
else
    echo "skipped: pytest and hypothesis are not installed (pip install pytest hypothesis)"
    suite=0
fi

# GPU_CHECK_TRAIN_FLAGS adds flags to this run, to try a variant: GPU_CHECK_TRAIN_FLAGS="--dropout 0.3"
read -r -a variant <<< "${GPU_CHECK_TRAIN_FLAGS:-}"
echo "== 180-s run: --size medium ${GPU_CHECK_TRAIN_FLAGS:+$GPU_CHECK_TRAIN_FLAGS }on raw Tiny Shakespeare ($data)"
"$python" train_shakespeare.py --data "$data" --size medium --time-budget 180 --out-dir "$out" --overwrite \
    --quiet ${variant[@]+"${variant[@]}"}
run=$?
"$python" - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"full_val_loss {s['full_val_loss']:.4f}, {s['tokens_per_second']:,.0f} tokens/s, "
      f"MFU {100 * s.get('mfu', 0):.1f}%, {s['elapsed_seconds']:.0f} s, {s['steps']} steps, "
      f"stopped by {s['stopped_because']}, dtype {s['dtype']}; best at step {s['best_step']}")
PY
grep -h "memorised the text" "$out/tinyllm_training.log" | sed 's/^.* INFO //'  # where the run memorised

echo "== generation benchmark: the model just trained, 1,000 tokens"
"$python" train_shakespeare.py --generate --benchmark --checkpoint "$out/best.pt" --num-chars 1000
generation=$?

echo "== exit codes: suite $suite, training $run, generation $generation"
[ "$suite" -eq 0 ] && [ "$run" -eq 0 ] && [ "$generation" -eq 0 ]
