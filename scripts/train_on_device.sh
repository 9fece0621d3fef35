#!/usr/bin/env bash
# Train a segmentation model on a lent GPU machine (the `device` tool's `run`), from the repository root
# there, for MINUTES, then hand back the weights and the log in $OUT. Prepared here, run there:
#
#   1. here: stop the CPU training (kill -TERM its pid; it saves runs/<name>/checkpoint.pt), then
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            -d .whl monai==1.6.0          # the device image has torch, numpy, scipy, yaml, safetensors
#   2. device run (timeout_s 600, at most 10 minutes a command):
#        command: bash scripts/train_on_device.sh configs/models/knee_coarse_v2.yaml 8
#        carry:   [".whl", "runs/knee_coarse_v2"]   # the generation-map cache and the checkpoint (~40 MB)
#   3. here: copy latest.safetensors and log.jsonl from the reply's files into training/<name>/, the
#      best weights (if any) into bml_pipeline/models/, commit, and restart the CPU training (it resumes
#      from the committed weights).
#
# Label maps are not needed there: the trainer reads the generation maps from the carried cache.
set -euo pipefail
CONFIG=${1:?config YAML}
MINUTES=${2:-8}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 - "$CONFIG" "$MINUTES" <<'PY'
import dataclasses
import sys

from bml_pipeline.segment.config import load_train_config
from bml_pipeline.segment.training import train

config = load_train_config(sys.argv[1])
config = dataclasses.replace(config, training=dataclasses.replace(
    config.training, device="cuda", data_workers=12, threads=2, durable_every_s=1e9))
train(config, minutes=float(sys.argv[2]))
t = config.training
print("trained; durable state in", t.durable_dir, "best weights in", t.export_path)
PY
NAME=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['model']['name'])" "$CONFIG")
DURABLE=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['training']['durable_dir'])" "$CONFIG")
cp "$DURABLE/latest.safetensors" "$OUT/latest.safetensors"
cp "$DURABLE/log.jsonl" "$OUT/log.jsonl"
[ -f "bml_pipeline/models/$NAME.safetensors" ] && cp "bml_pipeline/models/$NAME.safetensors" "$OUT/best.safetensors"
ls -la "$OUT"
