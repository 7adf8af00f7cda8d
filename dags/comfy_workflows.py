# airflow-comfy loader stub 1 of 2: copy into your Airflow dags folder, with comfy_workflow_errors.py. Every
# ComfyUI workflow JSON in the workflows folder ([comfy] workflows_folder, default: this folder) becomes a DAG.
# This file never fails because of a bad workflow: bad files are reported by comfy_workflow_errors.py.
from airflow_comfy import load_workflows

load_workflows(globals_dict=globals())
