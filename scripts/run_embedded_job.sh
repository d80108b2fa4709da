#!/usr/bin/env bash
# The embedded default job: trains the Deformable-Kernel Mask R-CNN (depthwise R18-FPN, from scratch)
# on the generated dk_shapes dataset on the CPU, evaluates it on dk_shapes_val with COCOEvaluator,
# prints the bbox and segm AP tables and writes predictions drawn on validation images as PNGs
# beside the metrics. The dataset is generated on first use under ${DETECTRON2_DATASETS:-datasets}.
#
#   scripts/run_embedded_job.sh [CONFIG.yaml] [KEY VALUE ...]   (run from anywhere)
#
# CONFIG defaults to configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml (dw: baseline, dkc: DK+DCN);
# KEY VALUE pairs override the config (e.g. OUTPUT_DIR output/x SOLVER.MAX_ITER 100).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CONFIG="configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml"
if [ $# -gt 0 ] && [[ "$1" == *.yaml ]]; then CONFIG="$1"; shift; fi

OUTPUT_DIR=$("$PY" - "$CONFIG" "$@" <<'PYEOF'
import sys
from detectron2.config import get_cfg
from dk_detectron2 import add_dk_config
cfg = get_cfg(); add_dk_config(cfg); cfg.merge_from_file(sys.argv[1]); cfg.merge_from_list(sys.argv[2:])
print(cfg.OUTPUT_DIR)
PYEOF
)
echo "[embedded job] training $CONFIG on dk_shapes_train (CPU); output in $OUTPUT_DIR"
start=$(date +%s)
PYTHONUNBUFFERED=1 "$PY" train_net.py --config-file "$CONFIG" "$@"
echo "[embedded job] done in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
"$PY" -m dk_detectron2.engine.report "$OUTPUT_DIR"
