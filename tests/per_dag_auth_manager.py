"""An auth manager with per-DAG access, for the gallery tests' api-server (``[core] auth_manager =
per_dag_auth_manager.PerDagAuthManager``; the fixture puts this file's folder on the api-server's PYTHONPATH).

Airflow's simple auth manager gives a role to every DAG alike, so no user of it lacks access to one DAG; a real
deployment's auth manager (FAB, a company's own) has per-DAG permissions. This one is the simple auth manager
(its users, passwords, login and tokens unchanged) that also refuses every action on the DAGs listed for a
user in ``[per_dag_auth_manager] denied`` (``user:dag_id`` pairs, comma-separated). Airflow lists a user's DAGs
(``get_authorized_dag_ids``, ``filter_authorized_dag_ids``, ``batch_is_authorized_dag``) through
``is_authorized_dag``, so refusing there hides the DAG everywhere.
"""

from __future__ import annotations

from airflow.api_fastapi.auth.managers.base_auth_manager import ResourceMethod
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.configuration import conf


def denied_pairs(setting: str) -> set[tuple[str, str]]:
    """The (user, dag_id) pairs of a ``user:dag_id,...`` setting; a sentence naming the entry when one is bad."""
    pairs = set()
    for entry in (part.strip() for part in setting.split(",")):
        if not entry:
            continue
        user, sep, dag_id = entry.partition(":")
        if not (sep and user and dag_id):
            raise ValueError(f"[per_dag_auth_manager] denied: {entry!r} is not a 'user:dag_id' pair")
        pairs.add((user, dag_id))
    return pairs


class PerDagAuthManager(SimpleAuthManager):
    """The simple auth manager, less the DAGs ``[per_dag_auth_manager] denied`` takes from some users."""

    def is_authorized_dag(self, *, method: ResourceMethod, user: SimpleAuthManagerUser,
                          access_entity: DagAccessEntity | None = None, details: DagDetails | None = None) -> bool:
        denied = denied_pairs(conf.get("per_dag_auth_manager", "denied", fallback=""))
        if details is not None and details.id and (user.get_name(), details.id) in denied:
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
