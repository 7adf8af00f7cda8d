"""A small fake Kubernetes API server for tests: HTTP on 127.0.0.1, spoken to by the real kubernetes clients
(the sync client that KubernetesPodOperator uses, kubernetes_asyncio in its trigger) through a kubeconfig.

It serves what KPO asks of the API for a pod: create, read, list (label selectors), patch (labels), delete,
its logs, the namespace's events (list and watch), and ``exec`` over a websocket (the v4 channel protocol:
KPO reads ``/airflow/xcom/return.json`` from the xcom sidecar and then stops the sidecar that way).

Each pod that is created plays the next scripted *outcome* of its task (the ``task_id`` label that KPO puts on
it): its state is a JSON document shaped like the API's own (``pod_document``), e.g. an evicted pod is
``phase: Failed, reason: Evicted`` with a ``DisruptionTarget`` condition. A fake scheduler puts each pod on the
first node whose labels satisfy the pod's ``nodeSelector`` and required node affinity.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import hashlib
import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

XCOM_SIDECAR = "airflow-xcom-sidecar"
BASE = "base"
EMPTY_XCOM = "__airflow_xcom_result_empty__"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

EVICTION_MESSAGE = ("The node was low on resource: memory. Threshold quantity: 100Mi, available: 91244Ki. "
                    "Container base was using 14893220Ki, request is 8Gi, has larger consumption of memory. ")
PREEMPTION_MESSAGE = "default-scheduler: preempting to accommodate a higher priority pod"
BAD_INPUT_MESSAGE = "error: node 3 (KSampler), input 'seed': must be an integer"
#: What each outcome's pod does. ``gone``: the pod vanishes from the API after the first read that shows its end
#: (a preempted pod is deleted by the scheduler; its object goes once the kubelet has stopped it).
OUTCOMES = ("evicted", "preempted", "preempted_gone", "oom_killed", "exit_1", "exit_2", "success")


def _ts(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _terminated(exit_code: int, reason: str, at: str, message: str | None = None) -> dict[str, Any]:
    state = {"exitCode": exit_code, "reason": reason, "startedAt": at, "finishedAt": at,
             "containerID": f"containerd://{uuid.uuid4().hex}"}
    if message:
        state["message"] = message
    return {"terminated": state}


def _container_status(name: str, image: str, state: dict[str, Any]) -> dict[str, Any]:
    running = "running" in state
    return {"name": name, "state": state, "lastState": {}, "ready": running, "restartCount": 0, "image": image,
            "imageID": f"{image.split(':')[0]}@sha256:{'0' * 64}", "started": running,
            "containerID": f"containerd://{uuid.uuid4().hex}"}


def _condition(kind: str, status: str, at: str, reason: str | None = None,
               message: str | None = None) -> dict[str, Any]:
    condition = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": at}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def pod_status(outcome: str, *, images: dict[str, str], at: datetime.datetime, sidecar_stopped: bool = False,
               node_ip: str = "10.0.0.11") -> dict[str, Any]:
    """The ``status`` of a pod that ended as ``outcome`` (what the API returns once it has ended).

    ``sidecar_stopped``: KPO has read the xcom and stopped the sidecar (pods whose runner ended on its own keep
    the sidecar running until then, phase ``Running``)."""
    t = _ts(at)
    base_image, sidecar_image = images.get(BASE, "runner:1"), images.get(XCOM_SIDECAR, "alpine")
    ready = [_condition("PodReadyToStartContainers", "True", t), _condition("Initialized", "True", t),
             _condition("PodScheduled", "True", t)]
    status: dict[str, Any] = {"hostIP": node_ip, "hostIPs": [{"ip": node_ip}], "podIP": "10.244.1.23",
                              "podIPs": [{"ip": "10.244.1.23"}], "startTime": t, "qosClass": "Burstable"}
    if outcome in ("evicted", "preempted", "preempted_gone"):
        if outcome == "evicted":
            status.update(phase="Failed", reason="Evicted", message=EVICTION_MESSAGE)
            disruption = _condition("DisruptionTarget", "True", t, "TerminationByKubelet", EVICTION_MESSAGE)
        else:
            status.update(phase="Failed")
            disruption = _condition("DisruptionTarget", "True", t, "PreemptionByScheduler", PREEMPTION_MESSAGE)
        status["conditions"] = [disruption, *ready,
                                _condition("Ready", "False", t, "PodFailed"),
                                _condition("ContainersReady", "False", t, "PodFailed")]
        status["containerStatuses"] = [
            _container_status(XCOM_SIDECAR, sidecar_image, _terminated(143, "Error", t)),
            _container_status(BASE, base_image, _terminated(137, "Error", t)),
        ]
        return status
    exit_code, reason, message = {
        "oom_killed": (137, "OOMKilled", None),
        "exit_1": (1, "Error", "error: could not read s3://bucket/runs/x: connection reset"),
        "exit_2": (2, "Error", BAD_INPUT_MESSAGE),
        "success": (0, "Completed", None),
    }[outcome]
    sidecar = _terminated(0, "Completed", t) if sidecar_stopped else {"running": {"startedAt": t}}
    phase = ("Succeeded" if exit_code == 0 else "Failed") if sidecar_stopped else "Running"
    status.update(phase=phase)
    status["conditions"] = [*ready, _condition("Ready", "True" if phase == "Running" else "False", t),
                            _condition("ContainersReady", "False", t, "ContainersNotReady")]
    status["containerStatuses"] = [
        _container_status(XCOM_SIDECAR, sidecar_image, sidecar),
        _container_status(BASE, base_image, _terminated(exit_code, reason, t, message)),
    ]
    return status


def pod_document(outcome: str, *, name: str = "wf-sample-abcd1234", namespace: str = "comfy",
                 node: str | None = "gpu-node-a", at: datetime.datetime | None = None,
                 sidecar_stopped: bool = True, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole pod as ``GET /api/v1/namespaces/<ns>/pods/<name>`` returns it once it has ended as ``outcome``;
    ``body``: the pod as it was created (default: a minimal runner pod)."""
    at = at or datetime.datetime.now(tz=datetime.timezone.utc)
    pod = copy.deepcopy(body) if body else {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "airflow-comfy"}},
        "spec": {"containers": [{"name": BASE, "image": "runner:1"}, {"name": XCOM_SIDECAR, "image": "alpine"}],
                 "restartPolicy": "Never"},
    }
    meta = pod.setdefault("metadata", {})
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("resourceVersion", "1")
    meta.setdefault("creationTimestamp", _ts(at))
    spec = pod.setdefault("spec", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    if node:
        spec["nodeName"] = node
    if outcome.startswith("preempted"):
        meta["deletionTimestamp"] = _ts(at + datetime.timedelta(seconds=30))
        meta["deletionGracePeriodSeconds"] = 30
    images = {c["name"]: c.get("image", "") for c in spec.get("containers", [])}
    pod["status"] = pod_status(outcome, images=images, at=at, sidecar_stopped=sidecar_stopped)
    return pod


# --- scheduling: node selector and required node affinity ----------------------------------------------------


def _matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = expression["key"], expression["operator"], expression.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        if key not in labels:
            return False
        return int(labels[key]) > int(values[0]) if op == "Gt" else int(labels[key]) < int(values[0])
    raise ValueError(f"unknown operator {op}")


def fits(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a node with ``labels`` satisfies ``pod``'s nodeSelector and required node affinity."""
    spec = pod.get("spec") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True
    return any(all(_matches(e, labels) for e in term.get("matchExpressions") or [])
               for term in required.get("nodeSelectorTerms") or [])


# --- the cluster ------------------------------------------------------------------------------------------------


@dataclass
class FakePod:
    body: dict[str, Any]  # as created (the API's copy, metadata filled in)
    outcome: str
    node: str | None
    created_at: datetime.datetime
    sidecar_stopped: bool = False
    gone: bool = False
    reads: int = 0

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    def document(self) -> dict[str, Any]:
        if self.node is None:  # nothing fits: Pending, unschedulable
            pod = copy.deepcopy(self.body)
            t = _ts(self.created_at)
            pod["status"] = {"phase": "Pending", "qosClass": "Burstable", "conditions": [_condition(
                "PodScheduled", "False", t, "Unschedulable",
                "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.")]}
            return pod
        return pod_document(self.outcome, node=self.node, at=self.created_at, sidecar_stopped=self.sidecar_stopped,
                            body=self.body)


@dataclass
class FakeCluster:
    """The state behind the server: ``outcomes`` (task id -> outcomes of its pods, in creation order) and the
    nodes (name -> labels; ``kubernetes.io/hostname`` is added)."""

    nodes: dict[str, dict[str, str]]
    outcomes: dict[str, list[str]]
    pods: dict[tuple[str, str], FakePod] = field(default_factory=dict)
    created: list[dict[str, Any]] = field(default_factory=list)  # each POSTed body, as sent, in order
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    resource_version: int = 100

    def node_labels(self, name: str) -> dict[str, str]:
        return {"kubernetes.io/hostname": name, **self.nodes[name]}

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.created.append(copy.deepcopy(body))
            task_id = (body.get("metadata", {}).get("labels") or {}).get("task_id", "")
            queue = self.outcomes.get(task_id) or []
            if not queue:
                self.errors.append(f"pod for task {task_id!r} created with no outcome left")
                raise LookupError(task_id)
            outcome = queue.pop(0)
            node = next((n for n in self.nodes if fits(body, self.node_labels(n))), None)
            stored = copy.deepcopy(body)
            meta = stored.setdefault("metadata", {})
            meta["namespace"] = namespace
            meta["uid"] = str(uuid.uuid4())
            self.resource_version += 1
            meta["resourceVersion"] = str(self.resource_version)
            now = datetime.datetime.now(tz=datetime.timezone.utc)
            meta["creationTimestamp"] = _ts(now)
            pod = FakePod(body=stored, outcome=outcome, node=node, created_at=now)
            self.pods[(namespace, pod.name)] = pod
            created = copy.deepcopy(stored)
            created["status"] = {"phase": "Pending", "qosClass": "Burstable"}
            return created

    def get(self, namespace: str, name: str) -> FakePod | None:
        pod = self.pods.get((namespace, name))
        return None if pod is None or pod.gone else pod

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            pod = self.get(namespace, name)
            if pod is None:
                return None
            pod.reads += 1
            if pod.outcome == "preempted_gone" and pod.reads > 1:
                pod.gone = True
                return None
            return pod.document()

    def list(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        with self.lock:
            pods = [p for (ns, _), p in self.pods.items() if ns == namespace and not p.gone]
            return [p.document() for p in pods if _selected(p.body["metadata"].get("labels") or {}, selector)]

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            pod = self.get(namespace, name)
            if pod is None:
                return None
            labels = (patch.get("metadata") or {}).get("labels") or {}
            pod.body["metadata"].setdefault("labels", {}).update(labels)
            return pod.document()

    def delete(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            pod = self.get(namespace, name)
            if pod is None:
                return None
            pod.gone = True
            self.deleted.append(name)
            document = pod.document()
            document["metadata"]["deletionTimestamp"] = _ts(datetime.datetime.now(tz=datetime.timezone.utc))
            return document

    def stop_sidecar(self, namespace: str, name: str) -> None:
        with self.lock:
            pod = self.get(namespace, name)
            if pod is not None:
                pod.sidecar_stopped = True

    def pods_of(self, task_id: str) -> list[dict[str, Any]]:
        """The bodies created for ``task_id``'s pods, in order (as KPO sent them)."""
        return [b for b in self.created if (b["metadata"].get("labels") or {}).get("task_id") == task_id]


def _selected(labels: dict[str, str], selector: str) -> bool:
    for part in filter(None, (p.strip() for p in selector.split(","))):
        if part.startswith("!"):
            if part[1:] in labels:
                return False
        elif "!=" in part:
            key, value = part.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif part not in labels:
            return False
    return True


# --- HTTP -------------------------------------------------------------------------------------------------------


def _not_found(kind: str, name: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f'{kind} "{name}" not found', "reason": "NotFound",
            "details": {"name": name, "kind": kind}, "code": 404}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    cluster: FakeCluster  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, document: Any, content_type: str = "application/json") -> None:
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _route(self) -> tuple[list[str], dict[str, list[str]]]:
        url = urlsplit(self.path)
        return [p for p in url.path.split("/") if p], parse_qs(url.query)

    def do_GET(self) -> None:  # noqa: N802
        parts, query = self._route()
        # /api/v1/namespaces/<ns>/pods[/<name>[/log|/exec]] or /api/v1/namespaces/<ns>/events
        if len(parts) < 5 or parts[:3] != ["api", "v1", "namespaces"]:
            return self._send(404, _not_found("path", self.path))
        namespace, resource = parts[3], parts[4]
        if resource == "events":
            if query.get("watch", ["false"])[0].lower() in ("true", "1"):
                time.sleep(0.5)  # a watch that saw nothing new
                return self._send(200, b"")
            return self._send(200, {"kind": "EventList", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": str(self.cluster.resource_version)}, "items": []})
        if resource != "pods":
            return self._send(404, _not_found(resource, ""))
        if len(parts) == 5:
            items = self.cluster.list(namespace, query.get("labelSelector", [""])[0])
            return self._send(200, {"kind": "PodList", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": str(self.cluster.resource_version)},
                                    "items": items})
        name = parts[5]
        if len(parts) == 7 and parts[6] == "exec":
            return self._exec(namespace, name, query)
        if len(parts) == 7 and parts[6] == "log":
            pod = self.cluster.get(namespace, name)
            if pod is None:
                return self._send(404, _not_found("pods", name))
            stamp = pod.created_at.strftime("%Y-%m-%dT%H:%M:%S.000000000Z")
            lines = [f"runner: group {pod.body['metadata'].get('labels', {}).get('task_id')} starting",
                     f"runner: pod {name} ({pod.outcome})"]
            stamped = query.get("timestamps", ["false"])[0].lower() == "true"
            text = "".join(f"{stamp} {line}\n" if stamped else f"{line}\n" for line in lines)
            return self._send(200, text.encode(), "text/plain")
        document = self.cluster.read(namespace, name)
        if document is None:
            return self._send(404, _not_found("pods", name))
        return self._send(200, document)

    def do_POST(self) -> None:  # noqa: N802
        parts, _ = self._route()
        body = self._body()
        try:
            return self._send(201, self.cluster.create(parts[3], body))
        except LookupError:
            return self._send(500, {"kind": "Status", "status": "Failure", "message": "no outcome", "code": 500})

    def do_PATCH(self) -> None:  # noqa: N802
        parts, _ = self._route()
        document = self.cluster.patch(parts[3], parts[5], self._body())
        return self._send(200, document) if document else self._send(404, _not_found("pods", parts[5]))

    def do_DELETE(self) -> None:  # noqa: N802
        parts, _ = self._route()
        self._body()
        document = self.cluster.delete(parts[3], parts[5])
        return self._send(200, document) if document else self._send(404, _not_found("pods", parts[5]))

    # --- exec over a websocket (v4.channel.k8s.io): channel byte + data in binary frames ---

    def _exec(self, namespace: str, name: str, query: dict[str, list[str]]) -> None:
        pod = self.cluster.get(namespace, name)
        if pod is None or self.headers.get("Upgrade", "").lower() != "websocket":
            return self._send(404, _not_found("pods", name))
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + _WS_GUID).encode()).digest())
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        command = " ".join(query.get("command", []))
        if query.get("stdin", ["false"])[0].lower() == "true":  # the sidecar's "kill": read what it is sent, then stop it
            self._read_frame()
            self.cluster.stop_sidecar(namespace, name)
        elif "return.json" in command:
            xcom = EMPTY_XCOM
            if pod.outcome == "success":
                labels = pod.body["metadata"].get("labels") or {}
                xcom = json.dumps({"manifest_uri": f"file:///artifacts/{labels.get('task_id')}/manifest.json",
                                   "pod": name})
            self._write_frame(b"\x01" + xcom.encode())
        self._write_frame(b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode())
        self._write_frame(struct.pack("!H", 1000), opcode=0x8)
        with contextlib.suppress(OSError):
            self.connection.settimeout(2)
            self._read_frame()  # the client's close

    def _write_frame(self, payload: bytes, opcode: int = 0x2) -> None:
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([126]) + struct.pack("!H", len(payload))
        else:
            header += bytes([127]) + struct.pack("!Q", len(payload))
        self.wfile.write(header + payload)
        self.wfile.flush()

    def _read_frame(self) -> bytes:
        head = self.rfile.read(2)
        if len(head) < 2:
            return b""
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self.rfile.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self.rfile.read(8))[0]
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = self.rfile.read(length)
        return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@contextlib.contextmanager
def fake_kubernetes(cluster: FakeCluster) -> Iterator[str]:
    """Serve ``cluster`` on a free loopback port; yields the server's URL."""
    handler = type("Handler", (_Handler,), {"cluster": cluster})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def kubeconfig(url: str, namespace: str = "comfy") -> dict[str, Any]:
    """A kubeconfig that points at the fake server (a token the server does not check)."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "fake-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
    }

