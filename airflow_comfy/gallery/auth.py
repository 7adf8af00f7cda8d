"""Who is asking, and may they: every gallery route's check. Airflow gives a plugin's FastAPI app no
authentication of its own, so each route resolves the caller's Airflow JWT through the configured auth manager,
as the api-server's own routes do (``airflow.api_fastapi.core_api.security.get_user``): the
``Authorization: Bearer`` header first, else the UI's session cookie (``_token``, which the browser also sends
to the plugin's pages shown in the UI's iframes and to links opened from it). Then the user's permission on the
DAG the object belongs to: ``GET`` on its runs to see, ``POST`` on its runs (what triggering needs) to upload.

Only imported by the api-server (through :mod:`airflow_comfy.gallery.app`).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request, status


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _refreshed_user(request: Request) -> Any:
    """The user Airflow's cookie-refreshing middleware already resolved from the session cookie (marked as
    such, as Airflow's own ``get_user`` requires), or None."""
    try:
        from airflow.api_fastapi.core_api.security import USER_INJECTED_BY_TRUSTED_MIDDLEWARE
    except ImportError:  # an Airflow without the marker: resolve the cookie ourselves
        return None
    user = getattr(request.state, "user", None)
    trusted = getattr(request.state, "user_authenticated_via", None) is USER_INJECTED_BY_TRUSTED_MIDDLEWARE
    return user if user and trusted else None


async def current_user(request: Request) -> Any:
    """The Airflow user the request's token belongs to; 401 without a token or with one that is not valid."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from jwt import InvalidTokenError

    token = _bearer(request)  # an explicit credential wins over the session cookie, as in Airflow
    if token is None:
        user = _refreshed_user(request)
        if user is not None:
            return user
        token = request.cookies.get(COOKIE_NAME_JWT_TOKEN) or None
    if not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Not authenticated: log in to Airflow first",
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        return await get_auth_manager().get_user_from_token(token)
    except InvalidTokenError:  # expired, revoked, forged: not someone we know
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Your Airflow session is not valid (expired or "
                            "revoked): log in again", headers={"WWW-Authenticate": "Bearer"}) from None


def may(user: Any, dag_id: str, method: str) -> bool:
    """Whether ``user`` may ``method`` (GET: see, POST: trigger) the runs of DAG ``dag_id``."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return get_auth_manager().is_authorized_dag(method=method, access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=dag_id), user=user)


def require(user: Any, dag_id: str, method: str) -> None:
    """403 unless :func:`may`."""
    if not may(user, dag_id, method):
        action = "see the runs of" if method == "GET" else "trigger"
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"You may not {action} the DAG {dag_id!r}")


def require_dag_read(user: Any, dag_id: str) -> None:
    """403 unless ``user`` may read DAG ``dag_id`` itself (its code, docs and so its workflow file)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    if not get_auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=dag_id), user=user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"You may not read the DAG {dag_id!r}")


def readable_dag_ids(user: Any) -> set[str]:
    """The DAGs whose runs ``user`` may see."""
    from airflow.api_fastapi.app import get_auth_manager

    return set(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))
