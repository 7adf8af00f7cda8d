"""Outputs in the Airflow UI: the gallery plugin's FastAPI app (:mod:`.app`, served by the api-server under
:data:`.urls.PREFIX`), its pages, and the URLs the group tasks' extra links point at (:mod:`.urls`).

Nothing is imported here: Airflow loads the plugin in every process, and only the api-server needs the app.
"""
