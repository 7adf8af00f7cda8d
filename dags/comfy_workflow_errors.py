# airflow-comfy loader stub 2 of 2: copy into your Airflow dags folder, with comfy_workflows.py. It defines no
# DAG: its airflow import error names every workflow file that cannot become a DAG (file, node, class, input).
# Kept apart because Airflow deactivates every DAG of a file that has an import error.
from airflow_comfy import report_workflow_errors

report_workflow_errors(globals_dict=globals())
