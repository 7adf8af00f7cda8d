"""Hostile workflow files never crash the loader: they load, or they raise a :class:`WorkflowError`.

A seeded, bounded mutation fuzzer over real workflows (the example workflows, UI and API format, and a few
``comfyui_workflow_templates`` templates with groups and subgraphs). Each mutant gets one to three mutations
(keys deleted, types swapped, huge / NaN numbers, odd ids, broken links and subgraphs, deep nesting) and goes
through the path the DAG factory takes (``compile_workflow``: parse, validate, slice, params, specs). Any
exception other than a ``WorkflowError`` naming the file fails, with the mutant's seed and description.

Mutant ``i`` of seed ``s`` is fully determined by ``(s, i)``, so a failure is reproducible by hand::

    python tests/test_fuzz.py --mutants 20000            # a larger budget
    python tests/test_fuzz.py --seed 7 --replay 1234      # one mutant, with its traceback
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from airflow_comfy.cli import main as cli_main
from airflow_comfy.factory.compile import compile_workflow
from airflow_comfy.factory.sidecar import Sidecar
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.slicing import SLICING_MODES

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
TEMPLATE_NAMES = (
    "default.json",                                  # the basic UI document
    "hiresfix_esrgan_workflow.json",                 # 10 groups
    "area_composition.json",                         # groups, Reroutes
    "flux1_dev_uso_reference_image_gen.json",        # subgraphs, bypassed instances
    "image_qwen_image_instantx_controlnet.json",     # subgraphs
)
SEED = 20240611
GENERIC_KINDS = frozenset({"malformed_workflow", "malformed_node"})
"""The kinds of the converter's safety nets: a message that names an exception, not what to fix."""
TEST_MUTANTS = 5000


# --------------------------------------------------------------------------------------------------------
# The corpus


@dataclass
class Base:
    """One real workflow to mutate."""

    name: str
    text: str
    paths: list[tuple] = field(default_factory=list)
    """Every path (keys / indexes) to a value inside the document."""

    def doc(self) -> Any:
        return json.loads(self.text)  # a fresh copy, faster than deepcopy


def _templates_dir() -> Path | None:
    spec = importlib.util.find_spec("comfyui_workflow_templates")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "templates"
    return folder if folder.is_dir() else None


def corpus() -> list[Base]:
    files = sorted(EXAMPLES.glob("*.json"))
    templates = _templates_dir()
    if templates is not None:
        files += [templates / name for name in TEMPLATE_NAMES if (templates / name).is_file()]
    bases = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        bases.append(Base(path.name, text, list(_paths(json.loads(text)))))
    return bases


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def fuzz_catalog(bases: list[Base]) -> Catalog:
    """The built-in catalog plus a stub for every other node type of the corpus (inputs and outputs as the
    UI documents declare them), so that the subgraph templates convert rather than stop at unknown types."""
    stubs: dict[str, Any] = {}
    builtin = Catalog.builtin()
    for base in bases:
        doc = json.loads(base.text)
        for node in _all_ui_nodes(doc):
            node_type = node.get("type")
            if isinstance(node_type, str) and node_type not in builtin and node_type not in stubs:
                stubs[node_type] = _stub(node)
    return builtin.extended(stubs, source="fuzz-stubs")


def _all_ui_nodes(doc: Any) -> Iterator[dict]:
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        return
    yield from (n for n in doc["nodes"] if isinstance(n, dict))
    for definition in (doc.get("definitions") or {}).get("subgraphs") or []:
        yield from (n for n in definition.get("nodes") or [] if isinstance(n, dict))


def _stub(node: dict) -> dict:
    inputs = {i["name"]: [i.get("type") or "*"] for i in node.get("inputs") or [] if i.get("name")}
    outputs = [o.get("type") or "*" for o in node.get("outputs") or []]
    return {"input": {"required": inputs}, "output": outputs}


# --------------------------------------------------------------------------------------------------------
# Mutations


RAW_TOKENS = (
    "1e309", "-1e309", "1" + "0" * 5000, "-" + "9" * 4400, "-0", "-0.0", "NaN", "Infinity", "-Infinity",
    "1e308", "18446744073709551616", "4.9e-324", "123456789012345678901234567890", "1" + "0" * 400,
)
"""Numbers written into the JSON text as they are (``json.dumps`` cannot write most of them)."""

ODD_IDS: tuple[Any, ...] = (
    "²", "3²", "①", "٣", "𝟑", "", " ", "9" * 5000, "-1", -1, 1.5, -10, -20, "-10", "-20", 0, "0", " 3",
    "3 ", "a:b", ":", "3:", True, None, 2**70, "1e3", "0x10", [], {},
)
FRONTEND_TYPES = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
SWAP_VALUES: tuple[Any, ...] = (
    "x", "", 0, 7, -1, 1.5, True, False, None, [], {}, [1, "a"], {"a": 1}, ["3", 0],
)


class Mutator:
    """Applies random mutations to one document, recording what it did."""

    def __init__(self, rng: random.Random, base: Base, doc: Any):
        self.rng = rng
        self.base = base
        self.doc = doc
        self.raw: list[str] = []
        self.steps: list[str] = []

    # helpers ----------------------------------------------------------------------------------------------

    def raw_token(self, token: str | None = None) -> str:
        """A placeholder string that :meth:`text` replaces by ``token`` (default: a random number)."""
        self.raw.append(token or self.rng.choice(RAW_TOKENS))
        return f"@@raw{len(self.raw) - 1}@@"

    def text(self) -> str:
        text = json.dumps(self.doc, ensure_ascii=False)
        for index, token in enumerate(self.raw):
            text = text.replace(f'"@@raw{index}@@"', token)
        return text

    def get(self, path: tuple) -> Any:
        value = self.doc
        for key in path:
            value = value[key]
        return value

    def resolves(self, path: tuple) -> bool:
        try:
            parent = self.get(path[:-1])
            return isinstance(parent, dict | list) and (path[-1] in parent if isinstance(parent, dict)
                                                        else -len(parent) <= path[-1] < len(parent))
        except (KeyError, IndexError, TypeError):
            return False

    def put(self, path: tuple, value: Any, what: str) -> str | None:
        if not path or not self.resolves(path):
            return None
        self.get(path[:-1])[path[-1]] = value
        if isinstance(value, str) and value.startswith("@@raw"):
            value = self.raw[int(value[5:-2])]
        text = repr(value)
        return f"{what}: {_show(path)} = {text if len(text) < 40 else f'{text[:16]}...({len(text)} chars)'}"

    def pick(self, suffixes: tuple[str, ...] = (), *, under: str | None = None) -> tuple | None:
        """A random path of the base document (ending in one of ``suffixes``, below key ``under``)."""
        candidates = self.base.paths
        if suffixes or under:
            candidates = [p for p in candidates if (not suffixes or _ends_in(p, suffixes))
                          and (under is None or under in p)]
        return self.rng.choice(candidates) if candidates else None

    # the mutations ----------------------------------------------------------------------------------------

    def delete(self) -> str | None:
        path = self.pick()
        if path is None or not self.resolves(path):
            return None
        del self.get(path[:-1])[path[-1]]
        return f"delete {_show(path)}"

    def swap_type(self) -> str | None:
        path = self.pick()
        current = self.get(path) if path and self.resolves(path) else None
        choices = [v for v in SWAP_VALUES if type(v) is not type(current)]
        return self.put(path, copy.deepcopy(self.rng.choice(choices)), "swap type") if path else None

    def huge_number(self) -> str | None:
        path = self.pick()
        return self.put(path, self.raw_token(), "huge number") if path else None

    def geometry(self) -> str | None:
        path = self.pick(("pos", "size", "bounding"))
        if path is None or not self.resolves(path):
            return None
        value = self.get(path)
        if isinstance(value, list) and value and self.rng.random() < 0.8:
            path = (*path, self.rng.randrange(len(value)))
        return self.put(path, self.raw_token() if self.rng.random() < 0.7 else self.rng.choice(SWAP_VALUES),
                        "geometry")

    def odd_id(self) -> str | None:
        if not isinstance(self.doc, dict):
            return None
        if "nodes" not in self.doc and self.doc and self.rng.random() < 0.5:
            return self._rename_api_node()
        path = self.pick(("id", "link", "links", "origin_id", "target_id", "linkIds", "parentId"))
        if path is None:
            return None
        return self.put(path, copy.deepcopy(self.rng.choice(ODD_IDS)), "odd id")

    def _rename_api_node(self) -> str:
        old = self.rng.choice(list(self.doc))
        new = str(self.rng.choice(ODD_IDS))
        self.doc[new] = self.doc.pop(old)
        if self.rng.random() < 0.5:  # and make its consumers follow it
            for node in self.doc.values():
                for value in _api_inputs(node).values():
                    if isinstance(value, list) and value and value[0] == old:
                        value[0] = new
        return f"odd id: rename API node {old!r} to {new[:20]!r}"

    def broken_link(self) -> str | None:
        if isinstance(self.doc, dict) and "nodes" in self.doc:
            return self._broken_ui_link()
        return self._broken_api_link()

    def _broken_ui_link(self) -> str | None:
        path = self.pick(under="links")
        if path is None:
            return None
        while path and path[-1] != "links" and not (isinstance(path[-1], int) and path[-2] == "links"):
            path = path[:-1]
        if not path or path[-1] == "links" or not self.resolves(path):
            return None
        link = self.get(path)
        if not isinstance(link, list) or len(link) < 5:
            return self.put(path, self.rng.choice([[], [1, 2], None, {"id": 1}, "x"]), "broken link")
        choice = self.rng.randrange(6)
        new = list(link)
        if choice == 0:
            new = new[: self.rng.randrange(5)]
        elif choice == 1:
            new += [0, "extra"]
        elif choice == 2:
            new[1] = new[3]  # a link from its own target
        elif choice == 3:
            new[self.rng.choice((1, 3))] = 987654  # a node that does not exist
        elif choice == 4:
            new[self.rng.choice((2, 4))] = self.rng.choice((-1, 99, 1.5, "0"))
        else:
            self.get(path[:-1]).append(new)  # the same link id twice
            return f"broken link: duplicate {_show(path)}"
        return self.put(path, new, "broken link")

    def _broken_api_link(self) -> str | None:
        prompt = self.doc.get("prompt") if isinstance(self.doc, dict) and "prompt" in self.doc else self.doc
        if not isinstance(prompt, dict):
            return None
        links = [(node_id, name) for node_id, node in prompt.items()
                 for name, value in _api_inputs(node).items() if isinstance(value, list)]
        if not links:
            return None
        node_id, name = self.rng.choice(links)
        origin = prompt[node_id]["inputs"][name][0] if prompt[node_id]["inputs"][name] else "1"
        new = self.rng.choice([[node_id, 0], ["99999", 0], [origin, -1], [origin, 99], [origin],
                               [origin, 0, 0], [origin, 1.5], [origin, "0"], [origin, True], [[origin], 0],
                               [None, 0]])
        prompt[node_id]["inputs"][name] = new
        return f"broken link: {node_id}.{name} = {new!r}"

    def broken_subgraph(self) -> str | None:
        doc = self.doc
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
            return None
        definitions = doc.get("definitions")
        subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
        if not isinstance(subgraphs, list) or not subgraphs:
            return self._new_subgraph()
        index = self.rng.randrange(len(subgraphs))
        definition = subgraphs[index]
        if not isinstance(definition, dict):
            return None
        return self._break_definition(subgraphs, index, definition)

    def _new_subgraph(self) -> str | None:
        nodes = [n for n in self.doc["nodes"] if isinstance(n, dict)]
        if not nodes:
            return None
        inner = copy.deepcopy(self.rng.sample(nodes, min(len(nodes), 3)))
        definition = {"id": "fuzz-def", "name": "fuzz", "nodes": inner, "links": copy.deepcopy(
            self.doc.get("links") if self.rng.random() < 0.5 else []),
            "inputs": [{"name": "model", "type": "MODEL", "linkIds": [1]}],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "linkIds": [2]}]}
        self.doc["definitions"] = {"subgraphs": [definition]}
        host = self.rng.choice(nodes)
        host["type"] = "fuzz-def"
        if self.rng.random() < 0.5:
            inner[0]["type"] = "fuzz-def"  # it contains itself
        return f"broken subgraph: node {host.get('id')!r} becomes an instance of a new definition"

    def _break_definition(self, subgraphs: list, index: int, definition: dict) -> str | None:
        choice = self.rng.randrange(7)
        where = f"definitions.subgraphs[{index}]"
        if choice == 0:
            del subgraphs[index]
            return f"broken subgraph: delete {where}"
        if choice == 1 and len(subgraphs) > 1:
            definition["id"] = subgraphs[index - 1].get("id") if isinstance(subgraphs[index - 1], dict) else 1
            return f"broken subgraph: {where} takes the id of its neighbour"
        if choice == 2 and isinstance(definition.get("nodes"), list) and definition["nodes"]:
            inner = self.rng.choice(definition["nodes"])
            if isinstance(inner, dict):
                inner["type"] = definition.get("id")
                return f"broken subgraph: {where} contains an instance of itself"
        if choice == 3:
            key = self.rng.choice(("inputs", "outputs"))
            definition[key] = self.rng.choice([[], None, "x", [{"name": "a"}] * 5, [None, 3]])
            return f"broken subgraph: {where}.{key} = {definition[key]!r}"
        if choice == 4 and isinstance(definition.get("links"), list):
            definition["links"].append({"id": 9999, "origin_id": -10, "origin_slot": 99, "target_id": -20,
                                        "target_slot": self.rng.choice((-1, 0, 99)), "type": "*"})
            return f"broken subgraph: {where} gets a link from its input slot 99 to its output"
        if choice == 5:
            key = self.rng.choice(("nodes", "links", "id", "name"))
            definition.pop(key, None)
            return f"broken subgraph: delete {where}.{key}"
        definition["nodes"] = [copy.deepcopy(definition)]  # a definition nested inside itself as a node
        return f"broken subgraph: {where}.nodes = [a copy of the definition]"

    def deep_nesting(self) -> str | None:
        path = self.pick()
        depth = self.rng.choice((50, 400, 900, 990, 3000))
        opening = "".join(self.rng.choice(("[", '{"a":')) for _ in range(depth))
        closing = "".join("]" if char == "[" else "}" for char in reversed(opening) if char in "[{")
        return self.put(path, self.raw_token(opening + "1" + closing), f"deep nesting ({depth} levels)") \
            if path else None

    def duplicate_node(self) -> str | None:
        nodes = self.doc.get("nodes") if isinstance(self.doc, dict) else None
        if not isinstance(nodes, list) or not nodes:
            return None
        index = self.rng.randrange(len(nodes))
        nodes.append(copy.deepcopy(nodes[index]))
        return f"duplicate nodes[{index}]"

    def retype(self) -> str | None:
        """A node becomes another type: a built-in one (its widgets no longer match), a frontend-only one, or
        an instance of a subgraph definition."""
        nodes = self._node_records()
        if not nodes:
            return None
        path, node = self.rng.choice(nodes)
        key = "type" if "nodes" in self.doc else "class_type"
        definitions = [d.get("id") for d in _definitions(self.doc)]
        node[key] = self.rng.choice([*FRONTEND_TYPES, *definitions, *Catalog.builtin().class_types()])
        return f"retype {path}: {key} = {node[key]!r}"

    def mode(self) -> str | None:
        nodes = self._node_records() if "nodes" in self.doc else []
        if not nodes:
            return None
        path, node = self.rng.choice(nodes)
        node["mode"] = self.rng.choice((2, 4, 4, -1, 99))
        return f"mode {path}: {node['mode']}"

    def subgraph_chain(self) -> str | None:
        """A node becomes the outer end of a chain of subgraph definitions, each holding the next."""
        nodes = self.doc.get("nodes") if isinstance(self.doc, dict) else None
        if not isinstance(nodes, list) or not nodes:
            return None
        length = self.rng.choice((5, 40, 300, 1500))
        chain = [{"id": f"chain{k}", "name": f"chain{k}", "inputs": [], "outputs": [], "links": [],
                  "nodes": [{"id": 1, "type": f"chain{k + 1}" if k + 1 < length else "SaveImage"}]}
                 for k in range(length)]
        self.doc["definitions"] = {"subgraphs": chain}
        host = self.rng.choice([n for n in self.doc["nodes"] if isinstance(n, dict)] or [{}])
        host["type"] = "chain0"
        return f"subgraph chain of {length} definitions at node {host.get('id')!r}"

    def _node_records(self) -> list[tuple[str, dict]]:
        doc = self.doc
        if isinstance(doc, dict) and isinstance(doc.get("nodes"), list):
            records = [(f"nodes[{i}]", n) for i, n in enumerate(doc["nodes"])]
            for d_index, definition in enumerate(_definitions(doc)):
                inner = definition.get("nodes") if isinstance(definition.get("nodes"), list) else []
                records += [(f"definitions.subgraphs[{d_index}].nodes[{i}]", n) for i, n in enumerate(inner)]
        else:
            records = list(doc.items()) if isinstance(doc, dict) else []
        return [(str(path), node) for path, node in records if isinstance(node, dict)]

    def post_body(self) -> str | None:
        """An API prompt sent as a POST /prompt body, carrying a UI workflow (maybe a broken one)."""
        if not isinstance(self.doc, dict) or "nodes" in self.doc or "prompt" in self.doc:
            return None
        workflow = self.rng.choice([{"nodes": [], "version": 0.4}, [], "x", None, {"nodes": "x"}])
        self.doc = {"prompt": self.doc, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
        return f"post body with extra_pnginfo.workflow = {workflow!r}"

    def mutations(self) -> list[Callable[[], str | None]]:
        """Every mutation; the plain ones (delete, swap type) twice, as they apply anywhere."""
        return [self.delete, self.swap_type, self.huge_number, self.geometry, self.odd_id, self.broken_link,
                self.broken_subgraph, self.deep_nesting, self.duplicate_node, self.swap_type, self.delete,
                self.retype, self.mode, self.subgraph_chain, self.post_body]


def _definitions(doc: Any) -> list[dict]:
    definitions = doc.get("definitions") if isinstance(doc, dict) else None
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    return [d for d in subgraphs if isinstance(d, dict)] if isinstance(subgraphs, list) else []


def _api_inputs(node: Any) -> dict:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _ends_in(path: tuple, keys: tuple[str, ...]) -> bool:
    return any(isinstance(part, str) and part in keys for part in path[-2:])


def _show(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# --------------------------------------------------------------------------------------------------------
# Running mutants


@dataclass
class Mutant:
    base: str
    index: int
    steps: list[str]
    text: str
    slicing: str = "auto"
    """The sidecar's slicing mode it is compiled with."""

    def describe(self, seed: int) -> str:
        return (f"mutant {self.index} (seed {seed}) of {self.base}, slicing {self.slicing}: "
                f"{'; '.join(self.steps)}")


def make_mutant(bases: list[Base], seed: int, index: int) -> Mutant:
    rng = random.Random(seed * 1_000_003 + index)
    base = bases[index % len(bases)]
    mutator = Mutator(rng, base, base.doc())
    for _ in range(rng.choice((1, 1, 2, 3))):
        for _attempt in range(5):  # some mutations do not apply to every document
            step = rng.choice(mutator.mutations())()
            if step:
                mutator.steps.append(step)
                break
    return Mutant(base.name, index, mutator.steps, mutator.text(), rng.choice(SLICING_MODES))


def check_mutant(mutant: Mutant, catalog: Catalog) -> str | None:
    """``None`` when the mutant loads or is refused with a ``WorkflowError`` naming its file; else what
    went wrong."""
    path = Path("fuzz") / mutant.base
    try:
        compile_workflow(path, mutant.text.encode("utf-8"), Sidecar(slicing=mutant.slicing), catalog,
                         max_nodes=2_000)
    except WorkflowError as exc:
        if not all(p.file == str(path) for p in exc.problems):
            return f"the WorkflowError does not name the file: {exc}"
        generic = [p for p in exc.problems if p.kind in GENERIC_KINDS]
        if generic:
            return f"a catch-all error instead of a specific one: {generic[0]}"
    except Exception as exc:  # what this test is looking for
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        return f"{type(exc).__name__}: {str(exc)[:200]} (at {where})"
    return None


def fuzz(count: int, seed: int = SEED, bases: list[Base] | None = None,
         catalog: Catalog | None = None) -> list[str]:
    """Run mutants ``0 .. count-1`` of ``seed``; the descriptions of those that crashed."""
    bases = bases or corpus()
    catalog = catalog or fuzz_catalog(bases)
    failures = []
    for index in range(count):
        mutant = make_mutant(bases, seed, index)
        problem = check_mutant(mutant, catalog)
        if problem:
            failures.append(f"{mutant.describe(seed)}\n    -> {problem}")
    return failures


# --------------------------------------------------------------------------------------------------------
# The tests


def test_mutants_load_or_raise_workflow_error():
    failures = fuzz(TEST_MUTANTS)
    assert not failures, (f"{len(failures)} of {TEST_MUTANTS} mutants crashed (replay one with `python "
                          f"tests/test_fuzz.py --seed {SEED} --replay INDEX`):\n" + "\n".join(failures[:20]))


def test_mutants_are_reproducible():
    bases = corpus()
    assert make_mutant(bases, SEED, 17) == make_mutant(bases, SEED, 17)


# --------------------------------------------------------------------------------------------------------
# One test per kind of crash the fuzzer found


def _api_doc() -> dict:
    return json.loads((EXAMPLES / "txt2img_api.json").read_text(encoding="utf-8"))


def _ui_doc() -> dict:
    return json.loads((EXAMPLES / "txt2img_grouped.json").read_text(encoding="utf-8"))


def _ui_node(doc: dict, node_id: int) -> dict:
    return next(node for node in doc["nodes"] if node["id"] == node_id)


def _renamed(doc: dict, old: str, new: str) -> dict:
    """The API prompt with node ``old`` called ``new``, its consumers following it."""
    doc = {new if node_id == old else node_id: node for node_id, node in doc.items()}
    for node in doc.values():
        for value in node["inputs"].values():
            if isinstance(value, list) and value[0] == old:
                value[0] = new
    return doc


def _write(tmp_path: Path, doc: Any, **raw: str) -> Path:
    """``doc`` as a file; each string value ``"@name"`` is written as the raw JSON text ``raw[name]``."""
    text = json.dumps(doc, ensure_ascii=False)
    for name, token in raw.items():
        text = text.replace(f'"@{name}"', token)
    path = tmp_path / "hostile.json"
    path.write_text(text, encoding="utf-8")
    return path


def _compile(path: Path, catalog: Catalog | None = None) -> Any:
    return compile_workflow(path, path.read_bytes(), Sidecar(), catalog or Catalog.builtin(), max_nodes=2_000)


def _refused(path: Path) -> WorkflowError:
    with pytest.raises(WorkflowError) as exc:
        _compile(path)
    assert all(p.file == str(path) for p in exc.value.problems)
    assert not [p for p in exc.value.problems if p.kind in GENERIC_KINDS], exc.value
    return exc.value


LONG_DIGITS = pytest.param("9" * 5000, id="5000-digits")
HUGE_INT = pytest.param("1" + "0" * 400, id="401-digit-int")


@pytest.mark.parametrize("odd", ["²", "3²", "①", LONG_DIGITS])
def test_odd_api_node_ids_load_and_are_named_in_errors(tmp_path, odd):
    """``str.isdigit()`` is true for all of these, yet ``int()`` refuses them: sorting ids raised."""
    compiled = _compile(_write(tmp_path, _renamed(_api_doc(), "1", odd)))
    assert any(odd in group["spec"]["nodes"] for group in compiled.groups)
    broken = _renamed(_api_doc(), "1", odd)
    del broken[odd]["class_type"]
    error = _refused(_write(tmp_path, broken))
    assert f"hostile.json: node {odd[:20]}" in str(error)


def test_json_integer_over_pythons_digit_limit_names_file_and_position(tmp_path):
    doc = _api_doc()
    doc["5"]["inputs"]["seed"] = "@seed"
    path = _write(tmp_path, doc, seed="1" + "0" * 5000)
    error = _refused(path)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "1000000" in text)
    assert f"{path}: not valid JSON: the number at line {line}, column" in str(error)
    assert "5,001 digits" in str(error)


@pytest.mark.parametrize("raw", ["1e309", "-1e309", "NaN", HUGE_INT])
@pytest.mark.parametrize("field", ["pos", "size"])
def test_non_finite_node_geometry_names_node_and_field(tmp_path, raw, field):
    doc = _ui_doc()
    _ui_node(doc, 5)[field][1] = "@value"
    error = _refused(_write(tmp_path, doc, value=raw))
    assert f"hostile.json: node 5 (KSampler): '{field}' must be two finite numbers" in str(error)


@pytest.mark.parametrize("raw", ["1e309", "Infinity", "NaN", HUGE_INT])
def test_non_finite_group_bounding_names_group_and_field(tmp_path, raw):
    doc = _ui_doc()
    doc["groups"][1]["bounding"][2] = "@value"
    error = _refused(_write(tmp_path, doc, value=raw))
    assert "hostile.json: group #1 ('Sampling'): 'bounding' must be four finite numbers" in str(error)


@pytest.mark.parametrize("link", ["²", "3²", "①", "--3", LONG_DIGITS])
def test_odd_link_id_names_node_class_and_input(tmp_path, link):
    """These raised ValueError inside the converter, reported as a 'malformed UI workflow' naming no node."""
    doc = _ui_doc()
    _ui_node(doc, 5)["inputs"][1]["link"] = link
    error = _refused(_write(tmp_path, doc))
    assert "hostile.json: node 5 (KSampler): input 'positive': link " in str(error)
    assert "is not in the links list" in str(error) and len(str(error)) < 300


@pytest.mark.parametrize("link", [1.5, True, [4], {"id": 4}], ids=["float", "bool", "list", "object"])
def test_link_that_is_not_a_number_names_node_class_and_input(tmp_path, link):
    doc = _ui_doc()
    _ui_node(doc, 5)["inputs"][1]["link"] = link
    error = _refused(_write(tmp_path, doc))
    expected = "hostile.json: node 5 (KSampler): input 'positive': inputs[1]: 'link' must be a link id"
    assert expected in str(error)


def test_json_nested_too_deeply_names_where(tmp_path):
    doc = _ui_doc()
    _ui_node(doc, 7)["widgets_values"] = "@deep"
    error = _refused(_write(tmp_path, doc, deep="[" * 500 + "]" * 500))
    expected = "hostile.json: the JSON is nested more than 100 levels deep, at nodes[6].widgets_values[0]"
    assert expected in str(error)


def test_subgraphs_nested_too_deeply_name_the_instance(tmp_path):
    doc = _ui_doc()
    doc["definitions"] = {"subgraphs": [
        {"id": f"d{k}", "name": f"d{k}", "inputs": [], "outputs": [], "links": [],
         "nodes": [{"id": 1, "type": f"d{k + 1}" if k < 599 else "SaveImage"}]} for k in range(600)]}
    _ui_node(doc, 8)["type"] = "d0"
    error = _refused(_write(tmp_path, doc))
    assert "hostile.json: node 8:1:1:1" in str(error)
    assert "subgraph instances are nested more than 32 deep" in str(error)


@pytest.mark.parametrize("command", ["convert", "slice", "render-pods"])
def test_cli_exits_2_without_a_traceback(tmp_path, command):
    doc = _ui_doc()
    _ui_node(doc, 5)["pos"][0] = "@value"
    path = _write(tmp_path, doc, value="1e309")
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    result = subprocess.run([sys.executable, "-m", "airflow_comfy.cli", command, str(path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {path}: node 5 (KSampler): 'pos' must be two finite numbers")


@pytest.mark.parametrize("command", ["convert", "slice"])
def test_cli_missing_file_exits_2(tmp_path, capsys, command):
    missing = tmp_path / "missing.json"
    assert cli_main([command, str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: cannot read the workflow file: No such file or directory\n"


# --------------------------------------------------------------------------------------------------------
# By hand


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=int, default=TEST_MUTANTS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--replay", type=int, default=None, help="run one mutant and show its traceback")
    args = parser.parse_args(argv)
    bases = corpus()
    catalog = fuzz_catalog(bases)
    if args.replay is not None:
        mutant = make_mutant(bases, args.seed, args.replay)
        print(mutant.describe(args.seed))
        compile_workflow(Path("fuzz") / mutant.base, mutant.text.encode(), Sidecar(slicing=mutant.slicing),
                         catalog, max_nodes=2_000)
        print("loaded")
        return 0
    started = time.monotonic()
    failures = fuzz(args.mutants, args.seed, bases, catalog)
    print("\n".join(failures))
    print(f"{args.mutants} mutants, {len(failures)} crashed, {time.monotonic() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main())
