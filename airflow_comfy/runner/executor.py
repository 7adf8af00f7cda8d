"""Execute one GroupSpec: read boundary inputs, run the nodes in dependency order, persist what other groups
read, stage images, and commit: publish the images and write the group's manifest (last: a manifest exists only
for a group that finished; see :mod:`airflow_comfy.runner.commit`).

A node that runs out of memory (:func:`airflow_comfy.runner.memory.is_out_of_memory`) is retried once: the
values no later node needs are dropped, memory is freed, and the node runs again in low-memory mode (tiled
VAE, sliced attention). The manifest and the run snapshot record it under ``low_memory`` (its pixels may
differ slightly from a normal run). Out of memory again: :class:`NodeOutOfMemory`, an infrastructure failure.

Before the first node runs, the files the nodes name are checked (:func:`check_file_inputs`): a missing input
image or model file is bad input at once, not after the checkpoint of an earlier node has been loaded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.manifest import GroupManifest, ImageRecord, OutputRecord
from airflow_comfy.artifacts.store import ArtifactStore, BadArtifact
from airflow_comfy.runner import cancel
from airflow_comfy.runner.codecs import decode_value, encode_value
from airflow_comfy.runner.commit import TryOutputs
from airflow_comfy.runner.context import BadInput, NodeContext, NodeOutOfMemory, RunContext, SavedImage, log
from airflow_comfy.runner.memory import free_memory, is_out_of_memory
from airflow_comfy.runner.models.files import ModelFileError
from airflow_comfy.runner.registry import implementation
from airflow_comfy.runner.run_stats import GroupStats, log_lines
from airflow_comfy.version import __version__
from airflow_comfy.workflow.api_format import convert_api
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.graph import Link, Node, sorted_node_ids
from airflow_comfy.workflow.groupspec import GroupSpec
from airflow_comfy.workflow.validate import check_node_constants


@dataclass
class GroupRun:
    spec: GroupSpec
    store: ArtifactStore
    run_key: str
    try_number: int
    params: Mapping[str, Any]
    input_manifests: list[GroupManifest]
    context: RunContext
    timings: dict[str, float] = field(default_factory=dict)
    low_memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Node id -> why it was retried in low-memory mode and what that mode did."""
    spec_sha256: str = ""
    outputs: TryOutputs | None = None
    """Staged images and the commit (made from the store, run key, group and try when not given)."""
    stats: GroupStats | None = None
    """Per-node seconds and bytes, peak memory (the manifest's ``stats``; made when the run starts)."""

    def execute(self) -> GroupManifest:
        started = time.perf_counter()
        self.stats = GroupStats(self.context.device)
        if self.outputs is None:
            self.outputs = TryOutputs(self.store, self.run_key, self.spec.group, self.try_number)
        nodes = self._nodes_with_params()
        check_file_inputs(nodes, self.context)
        self.context.prompt = self._metadata_prompt()
        self.context.extra_pnginfo = ({"workflow": self.spec.metadata["workflow"]}
                                      if self.spec.metadata.get("workflow") else None)
        self.context.components = {k: list(v) for k, v in self.spec.components.items()}
        self.context.save_image = self._save_image
        self.context.existing_outputs = self._existing_outputs
        results: dict[str, tuple] = {}
        boundary = _BoundaryReader(self.spec, self.input_manifests, self.context, self.store)
        order = execution_order(nodes)
        for index, node_id in enumerate(order):
            cancel.check()  # a runner service's job stops between nodes when its task goes away
            node = nodes[node_id]
            node_context = NodeContext(self.context, node_id, node.class_type)
            kwargs = {}
            bytes_before = boundary.bytes
            for name, value in self._declared_inputs(node).items():
                try:
                    kwargs[name] = self._resolve(value, results, boundary) if isinstance(value, Link) else value
                except (BadInput, BadArtifact, ModelFileError) as exc:
                    # Say which node and input needed the missing or unreadable upstream value.
                    raise node_context.bad_input(str(exc), name) from exc
            self.stats.read(node_id, node.class_type, boundary.bytes - bytes_before)
            began = time.perf_counter()
            self.context.current_node = f"node {node_id} ({node.class_type})"
            log.info("node %s (%s): start", node_id, node.class_type)
            error = None
            try:
                outputs = self._call(node, node_context, kwargs)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                # Outside the except block: the traceback, and the tensors its frames hold, are gone.
                self._drop_unneeded(results, nodes, order[index:])
                free_memory(self.context.device)
                log.warning("node %s (%s): out of memory (%s); memory freed, retrying once in low-memory mode "
                            "(tiled VAE, sliced attention)", node_id, node.class_type, error)
                node_context = NodeContext(self.context, node_id, node.class_type, low_memory=True)
                try:
                    outputs = self._call(node, node_context, kwargs)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise NodeOutOfMemory(
                        f"node {node_id} ({node.class_type}) ran out of memory, and again when retried in "
                        f"low-memory mode (tiled VAE, sliced attention): {type(exc).__name__}: {exc}") from exc
                self.low_memory[node_id] = {"group": self.spec.group, "class_type": node.class_type,
                                            "error": error[:1000], **node_context.low_memory_report}
            self.timings[node_id] = round(time.perf_counter() - began, 4)
            self.stats.node(node_id, node.class_type).seconds = self.timings[node_id]
            log.info("node %s (%s): done in %.2fs%s", node_id, node.class_type, self.timings[node_id],
                     " (low-memory mode)" if node_context.low_memory else "")
            results[node_id] = tuple(outputs)
        self.context.current_node = None
        records = [self._persist(p.node, p.output, p.type, results) for p in self.spec.persist]
        for record in records:
            self.stats.handed_off(record.node, nodes[record.node].class_type, record.bytes)
        stats = self.stats.to_dict()
        for line in log_lines(stats):
            log.info("%s", line)
        manifest = GroupManifest(
            workflow_name=self.spec.workflow_name, workflow_sha256=self.spec.workflow_sha256,
            group=self.spec.group, run_key=self.run_key, try_number=self.try_number,
            outputs=records,
            images=[ImageRecord(node=s.node, uri=s.uri, filename=s.filename, subfolder=s.subfolder,
                                width=s.width, height=s.height, sha256=s.sha256) for s in self.context.saved],
            timings={"nodes": self.timings, "total": round(time.perf_counter() - started, 4),
                     "boundary_read": round(boundary.seconds, 4)},
            models=dict(self.context.model_files),
            package_version=__version__,
            low_memory=self._low_memory_record(),
            spec_sha256=self.spec_sha256,
            params={name: self.params[name] for name in sorted(self.spec.params) if name in self.params},
            inputs=self._inputs_record(),
            stats=stats,
        )
        return self.outputs.commit(manifest, self._snapshot(manifest) if self.context.saved else None)

    @staticmethod
    def _call(node: Node, node_context: NodeContext, kwargs: dict[str, Any]) -> tuple:
        try:
            return implementation(node.class_type)(node_context, **kwargs)
        except ModelFileError as exc:
            # Model file errors name the folder and file; add the node, its class type and the input.
            raise node_context.bad_input(str(exc), _file_input(node, str(exc))) from exc

    def _drop_unneeded(self, results: dict[str, tuple], nodes: Mapping[str, Node], pending: list[str]) -> None:
        """Forget the outputs that neither a node still to run nor the persisted values need."""
        keep = {p.node for p in self.spec.persist}
        for node_id in pending:
            keep.update(link.node for link in nodes[node_id].links().values())
        for node_id in [n for n in results if n not in keep]:
            del results[node_id]

    # --- inputs ---------------------------------------------------------------------------------------

    def _nodes_with_params(self) -> dict[str, Node]:
        workflow = convert_api(copy.deepcopy(self.spec.nodes), name=self.spec.workflow_name, source="group spec",
                               external=frozenset(v.node for v in self.spec.boundary_inputs))
        nodes = dict(workflow.nodes)
        catalog = Catalog.builtin()
        for name, bindings in self.spec.params.items():
            if name not in self.params:
                continue
            for binding in bindings:
                if binding.node in nodes:
                    nodes[binding.node].inputs[binding.input] = self.params[name]
        checked = {}
        for node_id, node in nodes.items():
            try:
                checked[node_id] = check_node_constants(node, catalog, file=f"run param / group {self.spec.group}")
            except WorkflowError as exc:
                raise BadInput(str(exc)) from exc
        return checked

    def _metadata_prompt(self) -> dict | None:
        prompt = self.spec.metadata.get("prompt")
        if not prompt:
            return None
        prompt = copy.deepcopy(prompt)
        for name, bindings in self.spec.params.items():
            if name in self.params:
                for binding in bindings:
                    if binding.node in prompt:
                        prompt[binding.node]["inputs"][binding.input] = self.params[name]
        return prompt

    @staticmethod
    def _declared_inputs(node: Node) -> dict[str, Any]:
        spec = Catalog.builtin().get(node.class_type)
        declared = {s.name for s in spec.inputs}
        return {name: value for name, value in node.inputs.items() if name in declared}

    @staticmethod
    def _resolve(link: Link, results: dict[str, tuple], boundary: _BoundaryReader) -> Any:
        if link.node in results:
            return results[link.node][link.output]
        return boundary.read(link)

    # --- outputs --------------------------------------------------------------------------------------

    def _persist(self, node_id: str, output: int, type_name: str, results: dict[str, tuple]) -> OutputRecord:
        data, info = encode_value(type_name, results[node_id][output])
        key = layout.output_key(self.run_key, self.spec.group, self.try_number, node_id, output,
                                layout.extension_for(type_name))
        uri = self.store.put_bytes(key, data, overwrite=True)  # uncommitted until the manifest: replaceable
        return OutputRecord.from_info(node_id, output, type_name, uri, info)

    def _low_memory_record(self) -> dict[str, dict[str, Any]]:
        """This group's low-memory retries and those of the upstream groups whose values it read."""
        record: dict[str, dict[str, Any]] = {}
        for manifest in self.input_manifests:
            record.update(copy.deepcopy(manifest.low_memory))
        record.update(copy.deepcopy(self.low_memory))
        return record

    def _inputs_record(self) -> dict[str, str]:
        """The input images this group read and those its upstream groups read, with their sha256."""
        record: dict[str, str] = {}
        for manifest in self.input_manifests:
            record.update(manifest.inputs)
        record.update(self.context.input_files)
        return record

    def _save_image(self, node: str, subfolder: str, filename: str, png: bytes, width: int,
                    height: int) -> SavedImage:
        uri, sha256 = self.outputs.stage(node, subfolder, filename, png)
        saved = SavedImage(node, filename, subfolder, uri, width, height, sha256)
        if self.stats is not None:
            self.stats.image(node, self.stats.nodes[node].class_type if node in self.stats.nodes else "?", len(png))
        self.context.saved.append(saved)
        return saved

    def _existing_outputs(self) -> list[str]:
        return self.outputs.taken_names()

    def _snapshot(self, manifest: GroupManifest) -> dict[str, Any]:
        """Beside the images: the exact workflow, params, package version and model hashes that made them."""
        return {
            "workflow": self.spec.workflow_name,
            "workflow_sha256": self.spec.workflow_sha256,
            "group": self.spec.group,
            "run_key": self.run_key,
            "try": self.try_number,
            "params": dict(self.params),
            "prompt": self.context.prompt,
            "ui_workflow": self.spec.metadata.get("workflow"),
            "package_version": __version__,
            "models": dict(self.context.model_files),
            "inputs": manifest.inputs,
            "images": [s.uri for s in self.context.saved],
            "low_memory": manifest.low_memory,
        }


class _BoundaryReader:
    """Values produced by upstream groups, found through their manifests, decoded once each."""

    def __init__(self, spec: GroupSpec, manifests: list[GroupManifest], context: RunContext,
                 store: ArtifactStore):
        self.spec = spec
        self.context = context
        self.store = store
        self.seconds = 0.0
        self.bytes = 0
        """Bytes read from the store so far."""
        self._records: dict[tuple[str, int], OutputRecord] = {}
        for manifest in manifests:
            for record in manifest.outputs:
                self._records[(record.node, record.output)] = record
        self._cache: dict[tuple[str, int], Any] = {}

    def read(self, link: Link) -> Any:
        key = (link.node, link.output)
        if key in self._cache:
            return self._cache[key]
        if key not in self._records:
            expected = next((v.group for v in self.spec.boundary_inputs if (v.node, v.output) == key), "?")
            raise BadInput(f"group {self.spec.group!r} needs output {link.output} of node {link.node} from group "
                           f"{expected!r}, but no --inputs manifest provides it")
        record = self._records[key]
        began = time.perf_counter()
        data = self.store.read_uri(record.uri)
        self.bytes += len(data)
        value = decode_value(record.type, data, load_control_net=self._load_control_net,
                             uri=record.uri, sha256=record.sha256)
        self.seconds += time.perf_counter() - began
        self._cache[key] = value
        return value

    def _load_control_net(self, recipe):
        from airflow_comfy.runner.models import load_control_net

        return load_control_net(self.context, recipe)


def check_file_inputs(nodes: Mapping[str, Node], context: RunContext) -> None:
    """Every file-name input given as a constant names a file that is there: images in the input folder, model
    files in their models folder (and not a pickle file the run refuses). Cheap: nothing is read. Raises
    :class:`BadInput` naming the node id, its class type and the input."""
    catalog = Catalog.builtin()
    for node_id in sorted_node_ids(nodes):
        node = nodes[node_id]
        for spec in catalog.get(node.class_type).inputs:
            value = node.inputs.get(spec.name)
            if spec.folder is not None and spec.folder != "output" and isinstance(value, str):
                _check_file(NodeContext(context, node_id, node.class_type), spec.folder, spec.name, value)


def _check_file(node_context: NodeContext, folder: str, input_name: str, name: str) -> None:
    from airflow_comfy.runner.models.files import (
        MODEL_FOLDERS,
        is_pickle_file,
        pickle_refused,
        resolve_model_file,
    )
    from airflow_comfy.runner.nodes.image import check_input

    if folder == "input":
        check_input(node_context, name, input_name)
        return
    if folder not in MODEL_FOLDERS:
        return
    run = node_context.run
    try:
        path = resolve_model_file(run.models_root, folder, name, allow_dir=folder == "checkpoints")
        if is_pickle_file(path) and not run.allow_pickle:
            raise pickle_refused(path)
    except ModelFileError as exc:
        raise node_context.bad_input(str(exc), input_name) from exc


def _file_input(node: Node, message: str) -> str | None:
    """The input of ``node`` that names the model file a :class:`ModelFileError` is about (``None`` if unclear)."""
    names = [spec.name for spec in Catalog.builtin().get(node.class_type).inputs
             if spec.folder and isinstance(node.inputs.get(spec.name), str)]
    named = [name for name in names if node.inputs[name] in message]
    return (named or names)[0] if len(named or names) == 1 else None


def execution_order(nodes: Mapping[str, Node]) -> list[str]:
    """Dependencies first; among ready nodes, the lowest id first (deterministic)."""
    pending = {nid: {link.node for link in node.links().values() if link.node in nodes}
               for nid, node in nodes.items()}
    order: list[str] = []
    while pending:
        ready = sorted_node_ids(nid for nid, deps in pending.items() if not deps)
        if not ready:
            raise BadInput(f"the group's nodes form a cycle: {', '.join(sorted_node_ids(pending))}")
        for nid in ready:
            order.append(nid)
            del pending[nid]
        for deps in pending.values():
            deps.difference_update(ready)
    return order
