"""Slicing: partition the nodes that run into groups, one task each.

Where groups come from, in order of precedence:

1. the sidecar's explicit assignment (``groups: {name: [node ids]}``),
2. the UI format's group boxes (a node belongs to a box when the centre of its rectangle lies inside it, the
   frontend's rule; nested or overlapping boxes: the smallest box wins, ties go to the first box),
3. automatic stages around the sampler nodes: ``preprocess`` (image loading and encoding before sampling),
   ``inference`` (conditioning, ControlNet, latents, sampling), ``postprocess`` (decode, upscale, save); each
   stage is split into its independent branches so that they run in parallel.

``slicing: single`` keeps everything in one group.

The boundary rule: only serializable values (see :data:`~airflow_comfy.workflow.catalog.SERIALIZABLE_TYPES`)
cross groups. Nodes whose outputs are all model-like (loaders, LoRA, CLIP skip: *recipe* nodes) belong to no
group: each group that needs their result replays them, and the spec says which components it uses. The group
graph is made acyclic by merging the groups of any cycle, and everything is ordered deterministically, so the
same file always gives the same groups and task ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from airflow_comfy.workflow.catalog import SERIALIZABLE_TYPES, Catalog
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.graph import Link, Workflow, node_id_key, sorted_node_ids
from airflow_comfy.workflow.groupspec import BoundaryValue, GroupSpec, ParamBinding, PersistedValue

SLICING_MODES = ("auto", "ui-groups", "stages", "single")
SAMPLER_CATEGORIES = ("sampling",)
PREPROCESS, INFERENCE, POSTPROCESS, SINGLE = "preprocess", "inference", "postprocess", "main"
_TASK_ID_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Group:
    name: str
    """The task id: unique, ``[A-Za-z0-9_.-]``."""
    title: str
    """What people called it (UI group title, sidecar name, stage)."""
    nodes: list[str]
    """The nodes this group computes."""
    recipe_nodes: list[str] = field(default_factory=list)
    """Model-producing nodes replayed here because this group needs their result."""
    components: dict[str, list[str]] = field(default_factory=dict)
    boundary_inputs: list[BoundaryValue] = field(default_factory=list)
    persist: list[PersistedValue] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)


@dataclass
class GroupEdge:
    source: str
    target: str
    values: list[BoundaryValue]


@dataclass
class GroupGraph:
    workflow: Workflow
    mode: str
    """How the groups were found: ``sidecar``, ``ui-groups``, ``stages`` or ``single``."""
    groups: list[Group]
    """In a topological order."""
    edges: list[GroupEdge]
    output_nodes: frozenset[str] = frozenset()

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def specs(self, *, workflow_sha256: str, params: Mapping[str, list[ParamBinding]] | None = None,
              metadata: Mapping | None = None) -> list[GroupSpec]:
        """One :class:`GroupSpec` per group. ``params`` are the workflow's trigger-param bindings (every group
        gets all of them: a group applies those that name its nodes, and an output group also patches the
        PNG metadata's prompt with them). ``metadata`` goes to groups with output nodes."""
        specs = []
        for group in self.groups:
            members = group.recipe_nodes + group.nodes
            nodes = {nid: self.workflow.nodes[nid].to_api() for nid in sorted_node_ids(members)}
            output_nodes = [nid for nid in group.nodes if nid in self.output_nodes]
            specs.append(GroupSpec(
                workflow_name=self.workflow.name,
                workflow_sha256=workflow_sha256,
                group=group.name,
                nodes=nodes,
                recipe_nodes=list(group.recipe_nodes),
                components=dict(group.components),
                boundary_inputs=list(group.boundary_inputs),
                persist=list(group.persist),
                output_nodes=output_nodes,
                params={k: list(v) for k, v in (params or {}).items()},
                upstream=list(group.upstream),
                metadata=dict(metadata) if output_nodes and metadata else {},
            ))
        return specs

    def describe(self) -> dict:
        """A JSON-able summary (``airflow-comfy slice --json``)."""
        return {
            "workflow": self.workflow.name,
            "mode": self.mode,
            "groups": [
                {
                    "name": g.name,
                    "title": g.title,
                    "nodes": [{"id": n, "class_type": self.workflow.nodes[n].class_type} for n in g.nodes],
                    "recipe_nodes": [{"id": n, "class_type": self.workflow.nodes[n].class_type,
                                      "components": g.components.get(n, [])} for n in g.recipe_nodes],
                    "upstream": g.upstream,
                }
                for g in self.groups
            ],
            "edges": [
                {"from": e.source, "to": e.target,
                 "values": [{"node": v.node, "output": v.output, "type": v.type} for v in e.values]}
                for e in self.edges
            ],
        }


def slice_workflow(workflow: Workflow, catalog: Catalog, *, mode: str = "auto",
                   assignment: Mapping[str, Iterable[str]] | None = None) -> GroupGraph:
    """Partition a validated (pruned) workflow into groups. ``assignment`` is the sidecar's explicit
    ``{group name: [node ids]}`` and takes precedence over ``mode`` (except ``single``)."""
    if mode not in SLICING_MODES:
        raise WorkflowError(Problem(f"slicing must be one of {', '.join(SLICING_MODES)}, not {mode!r}",
                                    "bad_sidecar", file=workflow.source))
    slicer = _Slicer(workflow, catalog)
    if mode == "single":
        labels, used = slicer.single(), "single"
    elif assignment:
        labels, used = slicer.from_assignment(assignment), "sidecar"
    elif mode in ("auto", "ui-groups") and workflow.groups and slicer.ui_labels_found():
        labels, used = slicer.from_ui_groups(), "ui-groups"
    elif mode == "ui-groups":
        raise WorkflowError(Problem("slicing: ui-groups, but no node of the workflow is inside a UI group",
                                    "bad_sidecar", file=workflow.source))
    else:
        labels, used = slicer.from_stages(), "stages"
    return slicer.build(labels, used)


class _Slicer:
    def __init__(self, workflow: Workflow, catalog: Catalog):
        self.workflow = workflow
        self.catalog = catalog
        self.order = sorted_node_ids(workflow.nodes)
        self.recipe = {nid for nid in self.order if self._spec(nid).produces_only_unserializable}
        self.computed = [nid for nid in self.order if nid not in self.recipe]
        self.consumers = workflow.consumers()

    def _spec(self, node_id: str):
        return self.catalog.get(self.workflow.nodes[node_id].class_type)

    def _output_type(self, link: Link) -> str:
        return self._spec(link.node).outputs[link.output].type

    # --- where labels come from -------------------------------------------------------------------------

    def single(self) -> dict[str, str]:
        return dict.fromkeys(self.computed, SINGLE)

    def from_assignment(self, assignment: Mapping[str, Iterable[str]]) -> dict[str, str]:
        labels: dict[str, str] = {}
        problems = []
        for group_name, node_ids in assignment.items():
            for raw in node_ids:
                node_id = str(raw)
                if node_id not in self.workflow.nodes:
                    problems.append(Problem(
                        f"sidecar group {group_name!r} names node {node_id!r}, which is not among the nodes that "
                        "run", "bad_sidecar", file=self.workflow.source, node_id=node_id))
                elif node_id in labels and labels[node_id] != group_name:
                    problems.append(Problem(
                        f"sidecar puts node {node_id} in both {labels[node_id]!r} and {group_name!r}",
                        "bad_sidecar", file=self.workflow.source, node_id=node_id,
                        class_type=self.workflow.nodes[node_id].class_type))
                elif node_id not in self.recipe:
                    labels[node_id] = group_name
        if problems:
            raise WorkflowError(problems)
        return self._attach_ungrouped(labels)

    def _ui_membership(self) -> dict[str, str]:
        labels = {}
        for node_id in self.computed:
            rect = self.workflow.nodes[node_id].rect
            if rect is None:
                continue
            cx, cy = rect[0] + rect[2] / 2, rect[1] + rect[3] / 2
            inside = [g for g in self.workflow.groups if g.contains_point(cx, cy)]
            if inside:
                best = min(inside, key=lambda g: (g.area, g.index))
                labels[node_id] = f"ui:{best.index}"
        return labels

    def ui_labels_found(self) -> bool:
        return bool(self._ui_membership())

    def from_ui_groups(self) -> dict[str, str]:
        return self._attach_ungrouped(self._ui_membership())

    def from_stages(self) -> dict[str, str]:
        samplers = [nid for nid in self.computed if self._spec(nid).category in SAMPLER_CATEGORIES]
        if not samplers:
            return dict.fromkeys(self.computed, SINGLE)
        below = self._reach(samplers, downstream=True)   # strictly after some sampler
        above = self._reach(samplers, downstream=False)  # strictly before some sampler
        labels = {}
        for node_id in self.computed:
            if node_id in samplers or (node_id in below and node_id in above):
                labels[node_id] = INFERENCE
            elif node_id in below:
                labels[node_id] = POSTPROCESS
            elif node_id not in above and self._touches_images(node_id):
                labels[node_id] = PREPROCESS  # a side branch off the inputs, e.g. a preview of a Canny map
            elif self._is_image_stage(node_id):
                labels[node_id] = PREPROCESS
            else:
                labels[node_id] = INFERENCE
        return self._split_branches(labels)

    def _touches_images(self, node_id: str) -> bool:
        spec = self._spec(node_id)
        linked = self.workflow.nodes[node_id].links()
        types = {out.type for out in spec.outputs} | {s.type for s in spec.inputs if s.name in linked}
        return bool(types & {"IMAGE", "MASK"})

    def _is_image_stage(self, node_id: str) -> bool:
        """Image loading and encoding: nodes that make or transform images, masks, or encode them to latents."""
        spec = self._spec(node_id)
        out_types = {out.type for out in spec.outputs}
        in_types = {s.type for s in spec.inputs if s.name in self.workflow.nodes[node_id].links()}
        if out_types and out_types <= {"IMAGE", "MASK"}:
            return True
        return "LATENT" in out_types and bool(in_types & {"IMAGE", "MASK"}) and "LATENT" not in in_types

    def _reach(self, starts: list[str], *, downstream: bool) -> set[str]:
        seen: set[str] = set()
        stack = list(starts)
        while stack:
            node_id = stack.pop()
            if downstream:
                nxt = [c for c, _, _ in self.consumers.get(node_id, ())]
            else:
                nxt = [link.node for link in self.workflow.nodes[node_id].links().values()]
            for other in nxt:
                if other not in seen and other not in self.recipe:
                    seen.add(other)
                    stack.append(other)
        return seen

    def _split_branches(self, labels: dict[str, str]) -> dict[str, str]:
        """Within each stage, nodes connected only through replayed models are independent branches."""
        parent = {nid: nid for nid in labels}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for node_id in labels:
            for link in self.workflow.nodes[node_id].links().values():
                if link.node in labels and labels[link.node] == labels[node_id]:
                    a, b = find(node_id), find(link.node)
                    if a != b:
                        parent[max(a, b, key=node_id_key)] = min(a, b, key=node_id_key)
        per_stage: dict[str, list[str]] = {}
        for node_id in sorted_node_ids(labels):
            root = find(node_id)
            if root not in per_stage.setdefault(labels[node_id], []):
                per_stage[labels[node_id]].append(root)
        result = {}
        for node_id, stage in labels.items():
            roots = per_stage[stage]
            root = find(node_id)
            result[node_id] = stage if len(roots) == 1 else f"{stage}_{roots.index(root) + 1}"
        return result

    def _attach_ungrouped(self, labels: dict[str, str]) -> dict[str, str]:
        """Nodes outside every group join the group of their nearest consumer, else of their nearest producer,
        else a group of their own."""
        labels = dict(labels)
        pending = [nid for nid in self.computed if nid not in labels]
        for direction in ("down", "up"):
            changed = True
            while changed:
                changed = False
                for node_id in pending:
                    if node_id in labels:
                        continue
                    neighbours = (sorted_node_ids({c for c, _, _ in self.consumers.get(node_id, ())})
                                  if direction == "down" else
                                  sorted_node_ids({lk.node for lk in self.workflow.nodes[node_id].links().values()}))
                    for other in neighbours:
                        if other in labels:
                            labels[node_id] = labels[other]
                            changed = True
                            break
        for node_id in pending:
            labels.setdefault(node_id, "ungrouped")
        return labels

    # --- from labels to groups ----------------------------------------------------------------------------

    def build(self, labels: dict[str, str], mode: str) -> GroupGraph:
        labels = self._merge(labels, self._unsplittable_pairs(labels))
        labels = self._merge_cycles(labels)
        names = self._task_ids(labels, mode)
        members: dict[str, list[str]] = {}
        for node_id in self.computed:
            members.setdefault(labels[node_id], []).append(node_id)
        order = self._topological(labels, members)
        groups = {label: Group(name=names[label], title=self._title(label), nodes=members[label])
                  for label in order}
        edges: dict[tuple[str, str], list[BoundaryValue]] = {}
        for label in order:
            self._fill(groups[label], labels, names, edges)
        persisted: dict[str, dict[tuple[str, int], set[str]]] = {}
        for (source, target), values in edges.items():
            for value in values:
                persisted.setdefault(source, {}).setdefault((value.node, value.output), set()).add(target)
        for label in order:
            group = groups[label]
            for (node_id, output), consumers in sorted(persisted.get(group.name, {}).items(),
                                                       key=lambda kv: (node_id_key(kv[0][0]), kv[0][1])):
                group.persist.append(PersistedValue(node_id, output, self._output_type(Link(node_id, output)),
                                                    tuple(sorted(consumers))))
        edge_list = [GroupEdge(s, t, v) for (s, t), v in edges.items()]
        outputs = frozenset(nid for nid in self.computed if self._spec(nid).output_node)
        return GroupGraph(self.workflow, mode, [groups[label] for label in order], edge_list, outputs)

    def _unsplittable_pairs(self, labels: dict[str, str]) -> list[tuple[str, str]]:
        """A model-like value made by a node that also computes something (not a pure recipe) cannot be
        replayed cheaply nor handed over: its producer and consumer must share a group."""
        pairs = []
        for node_id in self.computed:
            for link in self.workflow.nodes[node_id].links().values():
                if (link.node in labels and labels[link.node] != labels[node_id]
                        and self._output_type(link) not in SERIALIZABLE_TYPES):
                    pairs.append((labels[link.node], labels[node_id]))
        return pairs

    @staticmethod
    def _merge(labels: dict[str, str], pairs: list[tuple[str, str]]) -> dict[str, str]:
        if not pairs:
            return labels
        parent: dict[str, str] = {}

        def find(x: str) -> str:
            parent.setdefault(x, x)
            while parent[x] != x:
                x = parent[x]
            return x

        for a, b in pairs:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        return {nid: find(label) if label in parent else label for nid, label in labels.items()}

    def _label_dependencies(self, labels: dict[str, str]) -> dict[str, set[str]]:
        """label -> labels it reads values from (through direct links or through replayed recipes)."""
        deps: dict[str, set[str]] = {label: set() for label in labels.values()}
        for node_id in self.computed:
            for producer in self._value_producers(node_id):
                if labels[producer] != labels[node_id]:
                    deps[labels[node_id]].add(labels[producer])
        return deps

    def _value_producers(self, node_id: str) -> set[str]:
        """Computed nodes whose outputs ``node_id`` needs, looking through recipe nodes."""
        found, stack, seen = set(), [node_id], {node_id}
        while stack:
            current = stack.pop()
            for link in self.workflow.nodes[current].links().values():
                if link.node in seen:
                    continue
                seen.add(link.node)
                if link.node in self.recipe:
                    stack.append(link.node)
                else:
                    found.add(link.node)
        return found

    def _merge_cycles(self, labels: dict[str, str]) -> dict[str, str]:
        deps = self._label_dependencies(labels)
        pairs = []
        for component in _strongly_connected(deps):
            if len(component) > 1:
                ordered = sorted(component)
                pairs += [(ordered[0], other) for other in ordered[1:]]
        merged = self._merge(labels, pairs)
        if pairs:  # the merged label should read as the union of its parts
            names = {}
            for component in _strongly_connected(deps):
                if len(component) > 1:
                    names[min(component)] = "+".join(sorted(component, key=self._first_node_key(labels)))
            merged = {nid: names.get(label, label) for nid, label in merged.items()}
        return merged

    def _first_node_key(self, labels: dict[str, str]):
        first: dict[str, tuple] = {}
        for node_id in self.computed:
            first.setdefault(labels[node_id], node_id_key(node_id))
        return lambda label: first.get(label, ())

    def _topological(self, labels: dict[str, str], members: dict[str, list[str]]) -> list[str]:
        deps = self._label_dependencies(labels)
        first = {label: node_id_key(nodes[0]) for label, nodes in members.items()}
        order: list[str] = []
        done: set[str] = set()
        while len(order) < len(members):
            ready = [label for label in members if label not in done and deps[label] <= done]
            label = min(ready, key=lambda lb: first[lb])
            order.append(label)
            done.add(label)
        return order

    def _title(self, label: str) -> str:
        if "+" in label:
            return "+".join(self._title(part) for part in label.split("+"))
        if label.startswith("ui:"):
            return self.workflow.groups[int(label[3:])].title
        return label

    def _task_ids(self, labels: dict[str, str], mode: str) -> dict[str, str]:
        names: dict[str, str] = {}
        used: set[str] = set()
        for label in sorted(set(labels.values()), key=self._first_node_key(labels)):
            base = _TASK_ID_RE.sub("_", self._title(label)).strip("_").lower() or "group"
            base = base[:200]
            name, n = base, 2
            while name in used:
                name, n = f"{base}_{n}", n + 1
            used.add(name)
            names[label] = name
        return names

    def _fill(self, group: Group, labels: dict[str, str], names: dict[str, str],
              edges: dict[tuple[str, str], list[BoundaryValue]]) -> None:
        own = set(group.nodes)
        recipes: set[str] = set()
        components: dict[str, set[str]] = {}
        boundary: dict[tuple[str, int], BoundaryValue] = {}
        stack = list(group.nodes)
        while stack:
            node_id = stack.pop()
            for link in self.workflow.nodes[node_id].links().values():
                if link.node in self.recipe:
                    components.setdefault(link.node, set()).add(self._output_type(link))
                    if link.node not in recipes:
                        recipes.add(link.node)
                        stack.append(link.node)
                elif link.node not in own:
                    source = names[labels[link.node]]
                    boundary.setdefault(link, BoundaryValue(link.node, link.output, self._output_type(link), source))
        group.recipe_nodes = sorted_node_ids(recipes)
        spec_order = {nid: [o.type for o in self._spec(nid).outputs] for nid in recipes}
        group.components = {nid: [t for t in dict.fromkeys(spec_order[nid]) if t in components[nid]]
                            for nid in group.recipe_nodes}
        group.boundary_inputs = [boundary[k] for k in sorted(boundary, key=lambda lk: (node_id_key(lk.node), lk.output))]
        for value in group.boundary_inputs:
            edges.setdefault((value.group, group.name), []).append(value)
        group.upstream = sorted({v.group for v in group.boundary_inputs})


def _strongly_connected(deps: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative; deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[set[str]] = []
    counter = 0
    for root in sorted(deps):
        if root in index:
            continue
        work = [(root, iter(sorted(deps[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(deps.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                result.append(component)
    return result
