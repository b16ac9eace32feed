"""Summaries for `gpd plan` (a dry run on a model) and `gpd inspect` (a file): plain dicts, JSON-ready."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch.fx as fx

from .analyse import describe, offered
from .io import PLAN_KEY, read_header, read_plan
from .layout import Layout, leaf_ids
from .memory import available_bytes
from .plan import DTYPES, FORMAT, VERSION, Plan


def _layouts(dims: Any) -> list[Layout]:
    """The layouts in a node's dims: a list for a tensor, nested tuples for tuples of tensors."""
    if isinstance(dims, list):
        return dims
    if isinstance(dims, tuple):
        return [lay for d in dims for lay in _layouts(d)]
    return []


def plan_report(planned: Any) -> dict[str, Any]:
    """Every space that could widen: its size, its teacher size, why not if it froze, and the ops that use it.
    ``planned``: an ``api.Planned`` (not imported: the API imports this module for ``inspect``)."""
    analysis, plan = planned.student.analysis, planned.plan
    spaces, gm = analysis.spaces, planned.student.gm
    users: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        # An op uses a space when its output or one of its inputs has a dimension over it.
        nodes = [node, *node.all_input_nodes]
        leaves = {leaf for n in nodes for lay in _layouts(analysis.dims.get(n.name)) for leaf in spaces.leaves(lay)}
        for leaf in leaves:
            users[leaf].append(node)
    rows = []
    candidates = offered(spaces)
    for i in range(len(spaces.parent)):
        if spaces.find(i) != i or i in spaces.definition or spaces.size[i] <= 1:
            continue
        if i not in candidates and i not in plan.leaves:
            continue  # batch, spatial and other dims that no rule offered to widen
        src = plan.leaves.get(i, (0, None))[1]
        reason = spaces.frozen[i]
        lost = i in candidates and reason is not None and not reason.startswith("by design")
        status = "expanded" if src is not None else "frozen" if lost else "kept"
        rows.append({
            "space": i, "size": spaces.size[i], "expanded_size": spaces.size[i] if src is None else len(src),
            "status": status, "reason": reason or ("" if src is not None else "no parameter uses it"),
            "used_by": [{"node": n.name, "op": describe(n, gm)} for n in users[i]],
        })
    out = _plan_numbers(plan)
    out.update({
        "input_shape": list(planned.student.input_shape),
        "build_bytes": planned.build_bytes(),
        "available_bytes": available_bytes(),
        "spaces": rows,
        "unsupported_ops": plan.report.get("unsupported", []),
        "seconds": round(planned.seconds, 3),
    })
    return out


def _plan_numbers(plan: Plan) -> dict[str, Any]:
    params = [r for r in plan.recipes if r.kind == "param"]
    student = sum(math.prod(r.shape) for r in params)
    teacher = sum(math.prod(shape) for shape, _ in plan.teacher_parameters().values())
    return {
        "ratio": plan.ratio,
        "student_params": student,
        "teacher_params": teacher,
        "param_ratio": teacher / student if student else 1.0,
        "teacher_bytes": plan.file_bytes(),
        "spaces_expanded": sum(1 for _, src in plan.leaves.values() if src is not None),
        "spaces_frozen": len(plan.report.get("frozen", [])),
        "frozen": plan.report.get("frozen", []),
    }


def inspect_file(path: str) -> dict[str, Any]:
    """What a file holds, read from its header only: a teacher (validated plan) or plain tensors."""
    meta, header = read_header(path)
    tensors = len(header)
    values = sum(math.prod(shape) for shape, _ in header.values())
    nbytes = sum(math.prod(shape) * DTYPES[dtype].itemsize for shape, dtype in header.values())
    dtypes: dict[str, int] = defaultdict(int)
    for _, dtype in header.values():
        dtypes[dtype] += 1
    out: dict[str, Any] = {
        "file": path, "file_bytes": os.path.getsize(path), "tensors": tensors, "values": values,
        "tensor_bytes": nbytes, "dtypes": dict(sorted(dtypes.items())),
    }
    if PLAN_KEY not in meta:
        return {"kind": "tensors", "format": "safetensors", **out,
                "metadata_keys": sorted(meta)}
    plan, _, _ = read_plan(path)
    users: dict[int, list[str]] = defaultdict(list)  # one pass over the recipes: linear in the plan's size
    for r in plan.recipes:
        for i in dict.fromkeys(i for _, lay, _ in r.dims for i in leaf_ids(lay)):
            users[i].append(r.key)
    leaves = [{"space": i, "size": size, "expanded_size": size if src is None else len(src), "tensors": users[i]}
              for i, (size, src) in sorted(plan.leaves.items())]
    return {
        "kind": "teacher", "format": f"{FORMAT} v{VERSION}", **out, **_plan_numbers(plan),
        "seed": plan.seed, "equal_shares": plan.equal_shares, "source": plan.source,
        "student_tensors": len(plan.recipes), "spaces": leaves, "unsupported_ops": plan.report.get("unsupported", []),
    }

