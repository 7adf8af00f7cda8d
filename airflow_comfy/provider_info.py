"""What ``airflow providers list`` and the Airflow configuration know about this provider."""

from __future__ import annotations

from airflow_comfy.version import __version__

# Each option: (type, default, description, example). Defaults may use {AIRFLOW_HOME}.
CONFIG_OPTIONS: dict[str, tuple[str, str, str, str | None]] = {
    "workflows_folder": (
        "string", "",
        "Folder whose *.json ComfyUI workflows become DAGs. Empty: the folder of the loader stub "
        "(usually the dags folder).",
        "/opt/airflow/comfy/workflows",
    ),
    "backend": (
        "string", "local",
        "Where group tasks run: 'local' (a subprocess on the worker) or 'kubernetes' (one pod per group). "
        "A workflow's sidecar can override it.",
        "kubernetes",
    ),
    "artifact_store": (
        "string", "file://{AIRFLOW_HOME}/comfy/artifacts",
        "Where groups hand over tensors and write images: a file:// folder or s3://bucket/prefix.",
        "s3://my-bucket/comfy",
    ),
    "aws_conn_id": (
        "string", "",
        "Airflow connection whose login/password (and extra aws_session_token, region_name, endpoint_url) "
        "become the local runner's AWS_* environment for an s3:// artifact_store, read when the task runs. "
        "Empty: the standard AWS environment or config of the worker.",
        "comfy_s3",
    ),
    "aws_secret_name": (
        "string", "",
        "Kubernetes Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ... keys) loaded into the environment "
        "of every group pod (envFrom). Empty: none (the image, IRSA or a pod template provides credentials).",
        "comfy-s3-credentials",
    ),
    "link_endpoint_url": (
        "string", "",
        "For an s3:// artifact_store: the endpoint the presigned URLs of the tasks' extra links name, when browsers "
        "reach the store at another address than the workers do (MinIO in a compose stack or a cluster). Empty: "
        "the workers' endpoint.",
        "http://localhost:9000",
    ),
    "models_path": (
        "string", "{AIRFLOW_HOME}/comfy/models",
        "ComfyUI-style models folder (checkpoints/, loras/, vae/, controlnet/, upscale_models/, embeddings/) "
        "as seen by the runner.",
        "/models",
    ),
    "input_path": (
        "string", "{AIRFLOW_HOME}/comfy/input",
        "Folder that LoadImage/LoadImageMask file names are resolved in (and confined to), as seen by the runner; "
        "an image param may also be a file:// URI of a file inside it.",
        "/inputs",
    ),
    "input_store": (
        "string", "",
        "s3://bucket/prefix of the input store: an image param may name an object under it (s3://bucket/prefix/"
        "cat.png), which the runner reads with the artifact store's credentials and bounds. Empty: none (image "
        "params are file names in input_path or file:// URIs inside it).",
        "s3://my-bucket/comfy-inputs",
    ),
    "object_info_files": (
        "string", "",
        "Comma-separated ComfyUI /object_info JSON files whose node definitions extend the catalog, so "
        "workflows with custom nodes convert and validate (they still need a runner that can execute them).",
        "/opt/airflow/comfy/object_info.json",
    ),
    "runner_python": (
        "string", "",
        "Python interpreter the local backend runs the runner with. Empty: the worker's own interpreter.",
        "/opt/comfy-venv/bin/python",
    ),
    "runner_image": (
        "string", f"airflow-comfy-runner:{__version__}",
        "Container image of group pods (must have airflow-comfy[runner] installed).",
        "registry.example.com/airflow-comfy-runner:0.1.0",
    ),
    "namespace": ("string", "default", "Kubernetes namespace of group pods.", "comfy"),
    "kubernetes_conn_id": (
        "string", "kubernetes_default", "Airflow connection used to reach the Kubernetes API.", None,
    ),
    "service_account_name": ("string", "", "Service account of group pods (empty: the namespace default).", None),
    "image_pull_policy": ("string", "IfNotPresent", "imagePullPolicy of group pods.", "Always"),
    "models_pvc": (
        "string", "",
        "PersistentVolumeClaim holding the models folder; mounted read-only into every group pod at "
        "pod_models_path.",
        "comfy-models",
    ),
    "pod_models_path": ("string", "/models", "Where the models folder is mounted inside group pods.", None),
    "pod_input_path": (
        "string", "/inputs",
        "Where LoadImage inputs are found inside group pods (provided by the image or a pod template).", None,
    ),
    "default_pool": (
        "string", "default_pool",
        "Airflow pool of group tasks that neither the sidecar nor a pool role (pools_file) places elsewhere.", None,
    ),
    "pools_file": (
        "string", "",
        "YAML file declaring the GPU pools: per pool its Airflow slots, GPUs per pod (and GPU resource name), "
        "memory, cpu, node selector, tolerations, runtime class, runner image and role (sampling | light: the "
        "groups that default to it). Sampling groups go to the 'sampling' pool, the others to the 'light' one; "
        "group pods request what their pool declares. 'airflow-comfy pools sync' creates the Airflow pools. "
        "Empty: no pools file (every group in default_pool; sampling pods request one nvidia.com/gpu).",
        "/opt/airflow/comfy/pools.yaml",
    ),
    "local_gpus": (
        "string", "",
        "GPUs the local backend hands out on this worker, one device per runner of a group with a model node "
        "(sampling, text encoding, VAE, ControlNet, model upscaling): the runner gets CUDA_VISIBLE_DEVICES set "
        "to a device no other runner holds (a lock file per device in device_lock_dir), waiting while all are "
        "held; a group without a model node gets none. Empty: no device management. 'auto': the devices the "
        "worker sees (CUDA_VISIBLE_DEVICES if set, else nvidia-smi -L). Or a comma-separated list of indices "
        "(as nvidia-smi numbers them), GPU- or MIG- UUIDs. Read by the worker when the task runs.",
        "0,1,3",
    ),
    "runners_per_gpu": (
        "integer", "1",
        "How many local runners may hold one of the local_gpus at once (more than 1 shares a card).", "2",
    ),
    "device_lock_dir": (
        "string", "{AIRFLOW_HOME}/comfy/gpu-locks",
        "Folder of the local_gpus lock files: one per device and runner slot, naming the task that holds it. "
        "Every worker on the machine must use the same folder, on a local file system (flock).",
        "/var/lock/airflow-comfy",
    ),
    "runner_service": (
        "boolean", "True",
        "Local backend: run each group in a warm runner service (python -m airflow_comfy.runner serve) instead "
        "of a fresh runner subprocess. One long-lived service per device slot (per local_gpus lock; for groups "
        "without a managed GPU, per runner_service_cpu_slots slot), started by the first task that needs it, "
        "keeps torch imported and the models it loaded in memory (up to runner_service_cache_mb), and runs one "
        "job at a time, with the same outputs as the subprocess. A task falls back to the subprocess when the "
        "service cannot be started, reached or used. Ignored by the kubernetes backend. Read by the worker when "
        "the task runs.",
        "False",
    ),
    "runner_service_dir": (
        "string", "",
        "Runtime folder of the runner services' sockets, busy locks and logs; this user's own, mode 0700. Empty: "
        "$XDG_RUNTIME_DIR/airflow-comfy, else <tmp>/airflow-comfy-<uid>.",
        "/run/airflow-comfy",
    ),
    "runner_service_socket": (
        "string", "",
        "Local backend: the Unix socket of a runner service that runs elsewhere (another container sharing "
        "this socket's folder, the models folder and the artifact store: the docker-compose stack's 'runner' "
        "service). Set, the task only connects to it: it never starts a service nor runs a runner subprocess, "
        "waits while the service runs another task's job, and fails (retried) naming the socket when no "
        "service answers. The job gets the service's own environment plus the task's variables (AWS_*, "
        "COMFY_*, the sidecar's env); its manifest is handed back through this socket's folder, so both sides "
        "must mount it at the same path and run as the same user. Implies runner_service; local_gpus must be "
        "empty (the service's container owns its GPUs). Empty: services are started on demand.",
        "/run/airflow-comfy/runner.sock",
    ),
    "runner_service_idle_timeout": (
        "float", "600",
        "Seconds without a job after which a runner service exits, giving its memory (and GPU memory) back.",
        "3600",
    ),
    "runner_service_cache_mb": (
        "float", "8192",
        "MiB of loaded models a runner service keeps between jobs (tensor bytes, on whatever device they are); "
        "the least recently used model goes first, and a model larger than this is not kept. 0: none.",
        "16384",
    ),
    "runner_service_cpu_slots": (
        "integer", "1",
        "Runner services for groups that run without a managed GPU (local_gpus empty, or a group without a "
        "model node). A task finding all of them busy runs a subprocess.",
        "2",
    ),
    "tiers": (
        "string", "vip:10000,high:1000,normal:100,batch:1",
        "Priority tiers as tier:weight, comma-separated. A run's tier is its trigger conf's 'tier' (a dropdown "
        "param of every workflow DAG), else the sidecar's 'priority', else default_tier; each of its task "
        "instances gets the tier's Airflow priority_weight (weight_rule 'absolute'), set by the provider's "
        "cluster policy.",
        "urgent:50000,vip:10000,high:1000,normal:100,batch:1",
    ),
    "default_tier": (
        "string", "normal", "Tier of the runs of workflows whose sidecar sets no 'priority'.", "batch",
    ),
    "preemption": (
        "boolean", "True",
        "VIP preemption: when a task of a preempt_tiers run has waited preempt_after seconds for a slot of its "
        "full pool, the scheduler clears the lowest-tier running task of that pool (Airflow's own clear of a "
        "running task: it is stopped and runs again later without using a retry). Read by the scheduler.",
        "False",
    ),
    "preempt_tiers": (
        "string", "",
        "Comma-separated tiers whose tasks may preempt; tasks of tiers weighted below the lowest of them may be "
        "preempted. Empty: the tier with the highest weight (vip).", "vip,high",
    ),
    "preempt_after": (
        "float", "5",
        "Seconds a preempting task waits for a slot of its pool before a running task is interrupted.", "2",
    ),
    "preempt_max": (
        "integer", "2",
        "Starvation guard: a task instance preempted this many times is not preempted again.", "1",
    ),
    "priority_classes": (
        "string",
        "vip:airflow-comfy-vip,high:airflow-comfy-high,normal:airflow-comfy-normal,batch:airflow-comfy-batch",
        "Kubernetes PriorityClass of group pods per tier, as tier:class, comma-separated (the classes of "
        "deploy/kubernetes/priority-classes.yaml must exist in the cluster). A tier left out, or an empty "
        "setting, sets no priorityClassName; a sidecar's priority_class_name wins.",
        "vip:gpu-critical,batch:gpu-preemptible",
    ),
    "cache_dir": (
        "string", "{AIRFLOW_HOME}/comfy/cache",
        "Parse cache: sliced workflows keyed by file content, so unchanged files are not re-sliced on every "
        "parse loop. Empty disables it.",
        None,
    ),
    "retries": (
        "integer", "0",
        "How many times Airflow retries a failed group task, unless the workflow's sidecar sets 'retries'. A "
        "runner that refuses its input (exit code 2) is never retried.",
        "2",
    ),
    "retry_delay": (
        "float", "60",
        "Seconds before the first retry, unless the sidecar sets 'retry_delay'.",
        "30",
    ),
    "retry_exponential_backoff": (
        "string", "false",
        "Whether the delay grows with each retry, unless the sidecar sets 'retry_exponential_backoff': 'true' "
        "doubles it each time, a number is the multiplier, 'false' keeps it constant.",
        "true",
    ),
    "max_retry_delay": (
        "string", "",
        "Longest delay between retries, in seconds, unless the sidecar sets 'max_retry_delay'. Empty: Airflow's "
        "[core] max_task_retry_delay.",
        "3600",
    ),
    "pod_disruption_restarts": (
        "integer", "3",
        "How many times one try of a group task starts a new pod when Kubernetes evicts or preempts its pod "
        "(status reason Evicted or Preempting, or a DisruptionTarget condition), before the try fails and "
        "Airflow retries the task.",
        None,
    ),
    "avoid_failed_nodes": (
        "boolean", "True",
        "A retry after a node failure (an evicted or preempted pod, an OOMKilled container, a lost node) keeps "
        "away from the node(s) where earlier tries of the group failed (a required node affinity "
        "'kubernetes.io/hostname NotIn'). Turn off on clusters with a single node of the kind a group needs.",
        None,
    ),
    "execution_timeout": (
        "string", "7200",
        "Seconds a group task may run (Airflow's execution_timeout), unless the sidecar sets 'execution_timeout'. "
        "The runner gets a deadline a little under it (env COMFY_RUNNER_DEADLINE_S: the timeout less 10%, at most "
        "30 s less), so that it says what it was doing and exits with code 1 (retried) before Airflow kills it. "
        "Empty: no limit.",
        "3600",
    ),
    "store_connect_timeout": (
        "float", "5",
        "Seconds one attempt to reach an s3:// artifact store may wait to connect.",
        None,
    ),
    "store_read_timeout": (
        "float", "20",
        "Seconds one attempt of an s3:// artifact store operation may wait for each answer.",
        None,
    ),
    "store_operation_timeout": (
        "float", "45",
        "Seconds one artifact store operation (a read, a write, a listing) may take in all, retries included; "
        "past it the task fails with a retryable error naming the object. 0: no deadline.",
        None,
    ),
    "store_attempts": (
        "integer", "4",
        "How many times an artifact store operation is tried when it fails in a way that may pass (a timeout, a "
        "cut connection, HTTP 5xx, throttling), with pauses of 0.5, 1, 2 ... s, within store_operation_timeout.",
        None,
    ),
    "max_workflow_bytes": ("integer", "5000000", "Workflow files larger than this are refused.", None),
    "max_workflow_nodes": ("integer", "2000", "Workflows with more nodes than this are refused.", None),
}


def provider_info() -> dict:
    return {
        "package-name": "airflow-comfy",
        "name": "ComfyUI",
        "description": "Run ComfyUI workflows as Airflow DAGs: one Kubernetes pod (or local subprocess) per node group.",
        "versions": [__version__],
        "operators": [
            {
                "integration-name": "ComfyUI",
                "python-modules": ["airflow_comfy.operators.pod", "airflow_comfy.operators.local"],
            }
        ],
        # What `airflow providers links` lists. The UI needs no registration: Airflow 3 shows a task's links from
        # the name -> XCom key pairs of its serialized operator (airflow_comfy/operators/links.py).
        "extra-links": ["airflow_comfy.operators.links.OutputImagesLink",
                        "airflow_comfy.operators.links.RunSnapshotLink"],
        "integrations": [
            {
                "integration-name": "ComfyUI",
                "external-doc-url": "https://github.com/comfyanonymous/ComfyUI",
                "tags": ["software"],
            }
        ],
        "config": {
            "comfy": {
                "description": "Settings of the airflow-comfy provider (ComfyUI workflows as DAGs).",
                "options": {
                    name: {
                        "description": description,
                        "version_added": "0.1.0",
                        "type": kind,
                        "example": example,
                        "default": default,
                    }
                    for name, (kind, default, description, example) in CONFIG_OPTIONS.items()
                },
            }
        },
    }
