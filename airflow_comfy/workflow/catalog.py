"""The node catalog: what each node type takes and returns, in ComfyUI's ``/object_info`` terms.

Two sources feed it:

* the built-in declarations (:mod:`airflow_comfy.workflow.core_nodes`): the nodes airflow-comfy's runner can
  execute, declared as plain data (no torch), and
* any number of ``object_info.json`` files (what a ComfyUI server's ``GET /object_info`` returns), so that
  workflows with custom nodes convert and validate too. Nodes known only from such a file are *known* but
  not *runnable*: a workflow that needs them is refused at parse time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_comfy.workflow.errors import Problem, WorkflowError

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
"""Input types the frontend draws as widgets (and so stores in ``widgets_values``)."""

SERIALIZABLE_TYPES = frozenset({"LATENT", "IMAGE", "MASK", "CONDITIONING", "INT", "FLOAT", "STRING", "BOOLEAN"})
"""Value types that may cross a group boundary (tensors + plain metadata, or primitives). Every other type
(MODEL, CLIP, VAE, CONTROL_NET, UPSCALE_MODEL, ...) is re-materialized in the consuming group from its recipe."""

SEED_INPUT_NAMES = frozenset({"seed", "noise_seed"})


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str
    """``INT``, ``FLOAT``, ``STRING``, ``BOOLEAN``, ``COMBO`` or a socket type (``MODEL``, ``IMAGE``, ``*``...)."""
    required: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    """ComfyUI's options dict: default, min, max, step, multiline, control_after_generate, image_upload,
    forceInput, ..."""
    choices: tuple | None = None
    """For ``COMBO``: the allowed values, or ``None`` when the list is the files of ``folder``."""
    folder: str | None = None
    """For file-name inputs: the root folder the value is confined to (``checkpoints``, ``loras``,
    ``input``, ``output`` ...)."""

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control_after_generate(self) -> bool:
        """The frontend adds a ``control_after_generate`` entry after this widget in ``widgets_values``
        (INT widgets that ask for it, and the legacy rule: an INT named seed/noise_seed that does not say
        otherwise; the frontend's ``control_after_generate ?? name in (seed, noise_seed)``)."""
        if self.type != "INT" or not self.is_widget:
            return False
        flag = self.options.get("control_after_generate")
        if flag is None:
            return self.name in SEED_INPUT_NAMES
        return bool(flag)

    @property
    def has_control_filter(self) -> bool:
        """COMBO inputs with ``control_after_generate`` get two extra entries (control + filter)."""
        return self.type == "COMBO" and bool(self.options.get("control_after_generate"))

    @property
    def has_upload_widget(self) -> bool:
        return any(self.options.get(key) for key in ("image_upload", "video_upload", "animated_image_upload"))

    def frontend_default(self) -> Any:
        """The value the frontend uses when ``widgets_values`` lacks one."""
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.choices[0] if self.choices else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    type: str
    is_list: bool = False


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...] = ()
    output_node: bool = False
    category: str = ""
    display_name: str = ""
    hidden: tuple[str, ...] = ()
    runnable: bool = False
    """True for nodes the built-in runner executes; False for nodes known only from an object_info file."""
    source: str = "built-in"

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    @property
    def widget_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(spec for spec in self.inputs if spec.is_widget)

    @property
    def produces_only_unserializable(self) -> bool:
        """A node whose every output is a model-like object (MODEL, CLIP, VAE ...): a *recipe* node, which is
        replayed in each group that needs its result instead of handing the result over."""
        return bool(self.outputs) and all(out.type not in SERIALIZABLE_TYPES for out in self.outputs)


_BUILTIN: Catalog | None = None


class Catalog:
    """Node type -> :class:`NodeSpec`. Immutable; :meth:`extended` returns a new catalog."""

    def __init__(self, specs: Mapping[str, NodeSpec], sources: tuple[str, ...] = ()):
        self._specs = dict(specs)
        self.sources = sources
        self._fingerprint: str | None = None

    def __contains__(self, class_type: str) -> bool:
        return class_type in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, class_type: str) -> NodeSpec | None:
        return self._specs.get(class_type)

    def class_types(self) -> list[str]:
        return sorted(self._specs)

    @classmethod
    def builtin(cls) -> Catalog:
        """The built-in catalog (one shared instance: it is immutable)."""
        global _BUILTIN
        if _BUILTIN is None:
            from airflow_comfy.workflow.core_nodes import CORE_NODES

            _BUILTIN = Catalog({spec.class_type: spec for spec in CORE_NODES}, sources=("built-in",))
        return _BUILTIN

    def extended(self, object_info: Mapping[str, Any], source: str = "object_info") -> Catalog:
        """This catalog plus the nodes of an ``/object_info`` document. Built-in (runnable) declarations win:
        they are what the runner executes."""
        specs = dict(self._specs)
        for class_type, spec in parse_object_info(object_info, source).items():
            if class_type not in specs or not specs[class_type].runnable:
                specs[class_type] = spec
        return Catalog(specs, sources=self.sources + (source,))

    def fingerprint(self) -> str:
        """Changes whenever any declaration changes; part of the parse-cache key."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for class_type in sorted(self._specs):
                digest.update(repr(self._specs[class_type]).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


def load_catalog(object_info_files: Iterable[str | Path] = ()) -> Catalog:
    """The built-in catalog extended by each object_info file, in order."""
    catalog = Catalog.builtin()
    for path in object_info_files:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkflowError(
                Problem(f"cannot read object_info file: {exc}", "bad_object_info", file=str(path))
            ) from exc
        catalog = catalog.extended(data, source=str(path))
    return catalog


def parse_object_info(data: Any, source: str = "object_info") -> dict[str, NodeSpec]:
    """Read ComfyUI's ``/object_info`` JSON into node specs (V1 and V3 encodings)."""
    if not isinstance(data, Mapping):
        raise WorkflowError(Problem("object_info must be a JSON object of class_type -> definition",
                                    "bad_object_info", file=source))
    specs = {}
    for class_type, info in data.items():
        if not isinstance(info, Mapping):
            raise WorkflowError(Problem("node definition is not an object", "bad_object_info",
                                        file=source, class_type=class_type))
        try:
            specs[class_type] = _node_from_info(class_type, info, source)
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            # Valid JSON of the wrong shape (an "input" that is a list, a non-list input_order ...).
            raise WorkflowError(Problem(f"malformed node definition: {exc}", "bad_object_info",
                                        file=source, class_type=class_type)) from exc
    return specs


def _node_from_info(class_type: str, info: Mapping[str, Any], source: str) -> NodeSpec:
    declared = info.get("input") or {}
    order = info.get("input_order") or {}
    inputs: list[InputSpec] = []
    for section in ("required", "optional"):
        section_inputs = declared.get(section) or {}
        names = list(order.get(section) or section_inputs.keys())
        names += [name for name in section_inputs if name not in names]
        for name in names:
            if name in section_inputs:
                inputs.append(_input_from_info(name, section_inputs[name], section == "required"))
    outputs = info.get("output") or []
    output_names = info.get("output_name") or outputs
    output_is_list = info.get("output_is_list") or [False] * len(outputs)
    return NodeSpec(
        class_type=class_type,
        inputs=tuple(inputs),
        outputs=tuple(
            OutputSpec(str(output_names[i]) if i < len(output_names) else str(out),
                       _type_name(out), bool(output_is_list[i]) if i < len(output_is_list) else False)
            for i, out in enumerate(outputs)
        ),
        output_node=bool(info.get("output_node")),
        category=str(info.get("category") or ""),
        display_name=str(info.get("display_name") or class_type),
        hidden=tuple((declared.get("hidden") or {}).keys()),
        runnable=False,
        source=source,
    )


def _type_name(value: Any) -> str:
    # V1 combos are declared by their option list; as an output type a list means COMBO as well.
    return "COMBO" if isinstance(value, list) else str(value)


def _input_from_info(name: str, decl: Any, required: bool) -> InputSpec:
    if not isinstance(decl, list | tuple) or not decl:
        decl = [decl]
    kind = decl[0]
    options = dict(decl[1]) if len(decl) > 1 and isinstance(decl[1], Mapping) else {}
    if isinstance(kind, list | tuple):  # V1 combo: the type is the list of choices
        return InputSpec(name, "COMBO", required, options, tuple(kind))
    if kind == "COMBO":  # V3 combo: choices live in the options
        return InputSpec(name, "COMBO", required, options, tuple(options.get("options") or ()))
    return InputSpec(name, str(kind), required, options)
