# airflow-comfy loader stub: copy into your Airflow dags folder. Every ComfyUI workflow JSON in the
# workflows folder ([comfy] workflows_folder, default: this folder) becomes a DAG.
from airflow_comfy import load_workflows

load_workflows(globals_dict=globals())
