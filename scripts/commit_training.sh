#!/usr/bin/env bash
# Commit the training state of a model (weights and log) so the next session, on any machine, resumes
# from it: training/<name>/ and the best weights bml_pipeline/models/<name>.safetensors.
#   scripts/commit_training.sh knee_coarse_v2
set -euo pipefail
NAME=${1:?model name, e.g. knee_coarse_v2}
cd "$(dirname "$0")/.."
STEP=$(tail -n 1 "training/$NAME/log.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["step"])')
BEST=$(grep '"val_mean"' "training/$NAME/log.jsonl" | python3 -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin]
best = max(rows, key=lambda r: r["val_mean"]) if rows else None
print("best val mean Dice %s at step %s" % (best["val_mean"], best["step"]) if best else "not validated yet")')
git add "training/$NAME" "bml_pipeline/models/$NAME.safetensors" 2>/dev/null || git add "training/$NAME"
git commit -q -m "$NAME training at step $STEP ($BEST): weights and log" && git log --oneline -1
