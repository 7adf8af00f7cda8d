#!/usr/bin/env bash
# make demo: tiny random-weight demo models, then the txt2img example DAG runs end to end through real Airflow
# (`airflow dags test`, local backend: each group is a runner subprocess; local artifact store).
set -euo pipefail
VENV=${VENV:-.venv}
DEMO=${DEMO:-.demo}
ROOT=$(pwd)
DEMO_DIR="$ROOT/$DEMO"
export AIRFLOW_HOME="$DEMO_DIR/airflow"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$DEMO_DIR/dags"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$DEMO_DIR/airflow/airflow.db"
export AIRFLOW__COMFY__WORKFLOWS_FOLDER="$ROOT/example_workflows"
export AIRFLOW__COMFY__ARTIFACT_STORE="file://$DEMO_DIR/artifacts"
export AIRFLOW__COMFY__MODELS_PATH="$DEMO_DIR/models"
export AIRFLOW__COMFY__INPUT_PATH="$DEMO_DIR/input"
export AIRFLOW__COMFY__CACHE_DIR="$DEMO_DIR/cache"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac  # the runner subprocesses need an absolute path
export AIRFLOW__COMFY__RUNNER_PYTHON="$VENV/bin/python"
# The demo runs its groups in the warm runner service (the second group finds the checkpoint loaded); it exits
# 20 s after the last group instead of the default 10 minutes, so nothing of the demo stays behind for long.
export AIRFLOW__COMFY__RUNNER_SERVICE_IDLE_TIMEOUT=20
export HF_HUB_OFFLINE=1
mkdir -p "$AIRFLOW_HOME" "$AIRFLOW__CORE__DAGS_FOLDER" "$DEMO_DIR/input"
cp dags/comfy_workflows.py dags/comfy_workflow_errors.py "$AIRFLOW__CORE__DAGS_FOLDER/"

echo "== demo models (tiny, RANDOM weights: the images will be noise) -> $DEMO_DIR/models"
"$VENV/bin/airflow-comfy" make-demo-models "$DEMO_DIR/models" --inputs "$DEMO_DIR/input" >/dev/null

echo "== the example workflows, as the DAG factory sees them"
"$VENV/bin/airflow-comfy" check example_workflows
echo
echo "== txt2img's groups"
"$VENV/bin/airflow-comfy" slice example_workflows/txt2img.json
echo
echo "== airflow dags test txt2img"
"$VENV/bin/airflow" db migrate >/dev/null 2>&1
started=$(date +%s)
"$VENV/bin/airflow" dags test txt2img > "$DEMO_DIR/dags-test.log" 2>&1 || {
  tail -40 "$DEMO_DIR/dags-test.log"; echo "airflow dags test failed; full log: $DEMO_DIR/dags-test.log"; exit 1; }
state=$(grep -o "DagRun Finished: dag_id=txt2img.*state=[a-z]*" "$DEMO_DIR/dags-test.log" | grep -o "state=[a-z]*" | tail -1)
echo "   dag run ${state:-state unknown} in $(( $(date +%s) - started )) s (log: $DEMO_DIR/dags-test.log)"
echo
run_dir=$(ls -td "$DEMO_DIR"/artifacts/runs/txt2img/*/ | head -1)
found=0
for png in "$run_dir"outputs/*.png; do
  [ -e "$png" ] || continue
  echo "output: $png"
  found=1
done
[ "$found" = 1 ] || { echo "no image was written under $run_dir"; exit 1; }
