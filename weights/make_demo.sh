#!/usr/bin/env bash
# Makes the built-in demo model (weights/demo/) from nothing: `digseg train --recipe demo` (synthetic data, a
# compact DiGSeg with the pretrained text encoder all-MiniLM-L6-v2, its VAE trained first, 128 px), then
# `digseg train --recipe demo-192` from it (1200 more steps at 192 px), then `digseg train --recipe demo-256` from
# that (1000 more at 256 px), its default resolution chosen on a tuning split, and its distilled fast decoder.
# Run from the repository root, in the environment the README installs; about 3.5 hours on a 2-core CPU with two
# torch threads.
set -euo pipefail
work=${1:-demo-build}
mkdir -p "$work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

digseg train --recipe demo --out "$work/run"
digseg train --recipe demo-192 --init "$work/run/best" --out "$work/run192"
digseg train --recipe demo-256 --init "$work/run192/best" --out "$work/run256"
# The default resolution: the best of 128, 192 and 256 px on a tuning split that is neither training data nor
# the evaluation split (weights/README.md gives the scores that chose it).
digseg data synth "$work/tune" --n 100 --seed 77
best=0 best_miou=-1
for r in 128 192 256; do
  digseg eval --dataset "$work/tune" --weights "$work/run256/best" --resolution $r --out "$work/tune-$r"
  miou=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['metrics']['miou'])" "$work/tune-$r/metrics.json")
  if python -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$miou" "$best_miou"; then
    best=$r best_miou=$miou
  fi
done
rm -rf "$work/chosen" && cp -r "$work/run256/best" "$work/chosen"
python - "$work/chosen/digseg_config.json" "$best" <<'PY'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["default_resolution"] = int(sys.argv[2])
open(path, "w").write(json.dumps(config, indent=2) + "\n")
PY
digseg decoder train --weights "$work/chosen" --out "$work/demo"
digseg eval --dataset synth --weights "$work/demo" --word-test synth --out "$work/eval"
echo "demo model written to $work/demo"
