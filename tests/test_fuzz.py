"""Property-based fuzzing of the plan parser and of whole teacher files (hypothesis).

Every mutant must end in a PlanError (exit 2 and one line from the CLI) or, for a harmless mutation,
in a valid result: never another exception, a hang, or a silently wrong answer. A teacher's plan
carries a checksum, so a plan that changed without it is refused; plans changed *with* a fresh
checksum (a deliberate edit) must be refused or give a structurally valid student.
"""
import contextlib
import copy
import json
import math
import os
import re
import signal
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from safetensors.torch import load as st_load, save as st_save

from conftest import gpd, make_teacher, run_limited
from gpd_surgery import io as gio
from gpd_surgery.collapsing import collapse
from gpd_surgery.errors import PlanError
from gpd_surgery.examples import small_cnn
from gpd_surgery.plan import DTYPES, Plan, check_tensors

# Deterministic (derandomize) so CI is reproducible; set GPD_FUZZ_SCALE=10 for a longer local hunt.
SCALE = float(os.environ.get("GPD_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fail, rather than hang, when one case takes too long."""
    def alarm(*_):
        raise TimeoutError(f"one case took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Base:
    """The valid teacher every mutant starts from (small_cnn width 4 at 1x3x8x8, x2, with branches)."""

    def __init__(self, folder):
        self.dir = folder
        self.path = folder / "teacher.safetensors"
        self.model = make_teacher(self.path, branches="default")  # CBR branches: more tensors, more plan
        self.data = self.path.read_bytes()
        self.header_end = 8 + struct.unpack("<Q", self.data[:8])[0]
        self.plan, self.tensors = gio.load_teacher_file(str(self.path))
        self.text = self.plan.to_json()
        self.meta = {gio.PLAN_KEY: self.text, gio.DIGEST_KEY: gio.plan_digest(self.text)}
        self.obj = json.loads(self.text)
        self.header = {k: (tuple(v.shape), gio.DTYPE_NAMES[v.dtype]) for k, v in self.tensors.items()}
        self.positions = list(_positions(self.obj))
        self.mutant = folder / "mutant.safetensors"

    def write(self, data: bytes):
        self.mutant.write_bytes(data)
        return str(self.mutant)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Base(tmp_path_factory.mktemp("fuzz"))


def assert_valid(plan: Plan, tensors: dict) -> dict:
    """What an accepted file must give: a student whose tensors have the shapes and dtypes of the recipes."""
    out = collapse(plan, tensors)
    assert set(out) == {r.key for r in plan.recipes}
    for r in plan.recipes:
        assert tuple(out[r.key].shape) == r.shape and out[r.key].dtype == DTYPES[r.dtype], r.key
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _gist(e: Exception) -> str:
    """The kind of a refusal, for hypothesis' statistics (--hypothesis-show-statistics)."""
    text = str(e).split(": ", 1)[-1] if str(e).startswith(("/", "invalid")) else str(e)
    return re.sub(r"'[^']*'|\S+\.\S+|\d+", "_", text.split("(")[0])[:60]


def load_or_refuse(path: str):
    """(plan, tensors), or None when refused with a PlanError; any other exception fails the test."""
    with no_hang():
        try:
            got = gio.load_teacher_file(path)
            event("accepted")
            return got
        except PlanError as e:
            assert str(e) and "\n" not in str(e)
            event(f"refused: {_gist(e)}")
            return None


# -- strategies ---------------------------------------------------------------------------------
SPECIAL = [0, 1, -1, 2, 3, 4, 8, 10, 16, 2**31, 2**62, 2**63, 2**64, 10**30, -(2**63), 1.0, 2.5, 1e308,
           "p", "c", "copy", "share", "param", "buffer", "float32", "int64", "bool", "", "student/x"]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=8) | st.sampled_from(SPECIAL))
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4) | st.sampled_from(["p", "c", "size", "src"]),
                                                        c, max_size=3),
    max_leaves=8,
)


def _positions(obj, path=()):
    """Every place in a JSON tree: the path to it."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _positions(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _positions(v, path + (i,))


@st.composite
def plan_mutants(draw, base):
    """The base plan with 1 to 3 random edits: replace, delete, duplicate, swap, nudge a number."""
    obj = copy.deepcopy(base.obj)
    for _ in range(draw(st.integers(1, 3))):
        path = base.positions[draw(st.integers(0, len(base.positions) - 1))]
        try:
            parent = obj
            for p in path[:-1]:
                parent = parent[p]
            if path:
                parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this place
        op = draw(st.sampled_from(["replace", "delete", "duplicate", "swap", "nudge"]))
        if not path:
            obj = draw(json_values) if op == "replace" else obj
            continue
        key, value = path[-1], parent[path[-1]]
        if op == "replace":
            parent[key] = draw(json_values)
        elif op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(value))
        elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
            j = draw(st.integers(0, len(parent) - 1))
            parent[key], parent[j] = parent[j], parent[key]
        elif op == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = value + draw(st.sampled_from([-2, -1, 1, 2, 10**6, -(10**6), 0.5]))
    return obj


# -- the plan parser ------------------------------------------------------------------------------
@fuzz(1500)
@given(v=json_values)
def test_parser_refuses_random_json(v):
    with no_hang(), pytest.raises(PlanError):
        Plan.from_json(json.dumps(v))


@fuzz(500)
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_parser_refuses_random_text(text):
    with no_hang(), pytest.raises(PlanError):
        Plan.from_json(text)


@fuzz(1000)
@given(data=st.data())
def test_parser_on_mutated_plans(base, data):
    obj = data.draw(plan_mutants(base))
    with no_hang():
        try:
            plan = Plan.from_json(json.dumps(obj))
            check_tensors(plan, base.header)
        except PlanError as e:
            assert str(e).startswith(("invalid plan", "the plan", "the file", "tensor ")), e
            event(f"refused: {_gist(e)}")
            return
        event("accepted")
        assert_valid(plan, base.tensors)  # accepted: it must still give a well-formed student


# -- whole teacher files ----------------------------------------------------------------------------
@st.composite
def byte_mutants(draw, base):
    """Damage in the header (length prefix and JSON): byte flips, insertions, deletions, truncation."""
    data = bytearray(base.data)
    kind = draw(st.sampled_from(["flip", "flip", "insert", "delete", "truncate", "length", "append"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, base.header_end - 1))
            data[i] = draw(st.integers(0, 255) | st.sampled_from(list(b' {}[]",:-.0123456789eE')))
    elif kind == "insert":
        i = draw(st.integers(8, base.header_end))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        i = draw(st.integers(0, base.header_end - 1))
        del data[i : i + draw(st.integers(1, 16))]
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data) + 16)))
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@fuzz(1500)
@given(data=st.data())
def test_files_with_damaged_headers(base, data):
    mutant = data.draw(byte_mutants(base))
    got = load_or_refuse(base.write(mutant))
    if got is not None:  # only a change that left plan and tensors as they were may pass
        plan, tensors = got
        assert plan.to_json() == base.text
        assert all(torch.equal(tensors[k], v) for k, v in base.tensors.items()) and set(tensors) == set(base.tensors)


@fuzz(150)
@given(data=st.data())
def test_files_with_changed_tensor_data(base, data):
    """Changed values (a trained teacher) are not damage: accepted, and collapsed from those very values."""
    mutant = bytearray(base.data)
    for _ in range(data.draw(st.integers(1, 8))):
        mutant[data.draw(st.integers(base.header_end, len(mutant) - 1))] = data.draw(st.integers(0, 255))
    got = load_or_refuse(base.write(bytes(mutant)))
    assert got is not None
    plan, tensors = got
    expected = st_load(bytes(mutant))
    assert plan.to_json() == base.text
    assert all(same(tensors[k], v) for k, v in expected.items())
    assert_valid(plan, tensors)


@fuzz(600)
@given(data=st.data(), fresh_digest=st.booleans())
def test_files_with_edited_plans(base, data, fresh_digest):
    obj = data.draw(plan_mutants(base))
    text = json.dumps(obj, separators=(",", ":"))
    meta = {gio.PLAN_KEY: text, gio.DIGEST_KEY: gio.plan_digest(text) if fresh_digest else base.meta[gio.DIGEST_KEY]}
    got = load_or_refuse(base.write(st_save(base.tensors, meta)))
    if got is None:
        return
    plan, tensors = got
    if not fresh_digest:  # the checksum lets only the very same plan through
        assert text == base.text
    assert_valid(plan, tensors)


@st.composite
def metadata_mutants(draw, base):
    meta = dict(base.meta)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([gio.PLAN_KEY, gio.DIGEST_KEY, "other", ""]))
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = draw(st.text(max_size=40) | st.sampled_from([base.text[:-1], base.text + " ", "{}", "null"]))
    return meta


@fuzz(300)
@given(data=st.data())
def test_files_with_edited_metadata(base, data):
    meta = data.draw(metadata_mutants(base))
    got = load_or_refuse(base.write(st_save(base.tensors, meta)))
    if got is not None:
        assert meta[gio.PLAN_KEY] == base.text and got[0].to_json() == base.text


@st.composite
def tensor_mutants(draw, base):
    """Tensors dropped, added, renamed, reshaped, retyped, or only given new values (harmless)."""
    tensors = dict(base.tensors)
    keys = sorted(tensors)
    kind = draw(st.sampled_from(["drop", "add", "rename", "reshape", "retype", "values"]))
    k = draw(st.sampled_from(keys))
    t = tensors[k]
    if kind == "drop":
        del tensors[k]
    elif kind == "add":
        tensors[draw(st.text(min_size=1, max_size=12) | st.sampled_from(["student/x", "student/" + k]))] = torch.zeros(2)
    elif kind == "rename":
        tensors[draw(st.sampled_from(keys) | st.text(min_size=1, max_size=12)) + "_"] = tensors.pop(k)
    elif kind == "reshape":
        shape = draw(st.lists(st.integers(0, 9), max_size=4).filter(lambda s: tuple(s) != tuple(t.shape)))
        tensors[k] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "retype":
        dtype = draw(st.sampled_from([d for d in DTYPES.values() if d != t.dtype]))
        tensors[k] = t.to(dtype)
    else:
        tensors[k] = torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else t + 1
    return kind, tensors


@fuzz(500)
@given(data=st.data())
def test_files_with_edited_tensors(base, data):
    kind, tensors = data.draw(tensor_mutants(base))
    got = load_or_refuse(base.write(st_save(tensors, base.meta)))
    if kind != "values":
        assert got is None, kind
        return
    plan, loaded = got
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert_valid(plan, loaded)


# -- the command line -------------------------------------------------------------------------------
@fuzz(300)
@given(data=st.data())
def test_gpd_extract_on_mutants(base, data):
    """Through the CLI: exit 2 with one line and no output file, or exit 0 with a student that loads strictly."""
    how = data.draw(st.sampled_from(["bytes", "plan", "tensors"]))
    if how == "bytes":
        mutant = data.draw(byte_mutants(base))
    elif how == "plan":
        text = json.dumps(data.draw(plan_mutants(base)))
        mutant = st_save(base.tensors, {gio.PLAN_KEY: text, gio.DIGEST_KEY: gio.plan_digest(text)})
    else:
        mutant = st_save(data.draw(tensor_mutants(base))[1], base.meta)
    out = base.dir / "student.safetensors"
    with no_hang(20):
        r = gpd("extract", base.write(mutant), "-o", out, "--force")
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    if r.exit_code == 2:
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
        assert not out.exists()
        return
    assert r.exit_code == 0, r.output
    state = st_load(out.read_bytes())
    out.unlink()
    if how == "plan":
        return  # a deliberate plan edit: well-formed (checked in test_files_with_edited_plans), maybe not this model
    small_cnn(width=4).load_state_dict(state, strict=True)
    expected = collapse(base.plan, gio.load_teacher_file(str(base.mutant))[1])
    assert all(same(state[k], v) for k, v in expected.items())


# -- plans with huge sizes and empty tensors, run under a memory and time budget ----------------------
# What a file holds bounds what reading it may cost: a plan of spaces up to 2^62 over tensors with no
# elements must neither allocate (1 GiB of address space beyond the interpreter's) nor run long (20 s).
sizes = st.integers(1, 8) | st.sampled_from([2**20, 2**27, 2**31, 2**40, 2**62])


@st.composite
def huge_plans(draw):
    """A structurally valid plan whose spaces may be huge, and the tensors its file must hold."""
    n = draw(st.integers(1, 6))
    spaces: dict[str, dict] = {}
    size_of: dict[int, tuple[int, int]] = {}  # space -> (student, teacher) size
    for i in range(n):
        size = draw(sizes)
        if size <= 8 and draw(st.booleans()):
            src = list(range(size)) * 2
            spaces[str(i)] = {"size": size, "src": src}
            size_of[i] = (size, 2 * size)
        else:
            spaces[str(i)] = {"size": size}
            size_of[i] = (size, size)
    mapped = [i for i in size_of if size_of[i][1] != size_of[i][0]] or [None]

    def layout(depth=0):
        if depth > 1 or draw(st.booleans()):
            i = draw(st.sampled_from(sorted(size_of)))
            return i, *size_of[i]
        parts = [layout(depth + 1) for _ in range(draw(st.integers(1, 3)))]
        kind = draw(st.sampled_from(["p", "c"]))
        s = t = 1 if kind == "p" else 0
        for _, ps, pt in parts:
            s, t = (s * ps, t * pt) if kind == "p" else (s + ps, t + pt)
        return {kind: [p for p, _, _ in parts]}, s, t

    recipes, tensors, branches = [], {}, {}
    for k in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(1, 4))
        shape, tshape, dims = [], [], []
        for d in range(ndim):
            if mapped[0] is not None and draw(st.booleans()):
                lay, s, t = layout()
                if mapped[0] not in _ids(lay):  # every widened dim needs a map in its layout
                    lay = {"p": [lay, mapped[0]]}
                    s, t = s * size_of[mapped[0]][0], t * size_of[mapped[0]][1]
                if s >= 2**62 or t >= 2**62:
                    continue
                dims.append([d, lay, draw(st.sampled_from(["copy", "share"]))])
                shape.append(s)
                tshape.append(t)
            else:
                size = draw(sizes)
                shape.append(size)
                tshape.append(size)
        ndim = len(shape)
        dims = [[d, lay, mode] for d, lay, mode in dims if d < ndim]
        if math.prod(tshape) * 4 > 1 << 16:  # a file may not hold gigabytes: empty it along a plain dim
            plain = [d for d in range(ndim) if d not in {e[0] for e in dims}]
            if not plain:
                continue
            shape[plain[0]] = tshape[plain[0]] = 0
        key = f"m{k}.weight"
        recipes.append({"key": key, "kind": "param", "shape": shape, "dtype": "float32", "teacher": True,
                        "dims": dims})
        tensors[key] = torch.zeros(tshape)
        if ndim == 4 and draw(st.booleans()):
            kinds = draw(st.lists(st.sampled_from(["1x1", "kxk", "avg", "1x1-kxk"]), min_size=1, max_size=2,
                                  unique=True))
            if "1x1-kxk" in kinds and tshape[1] * tshape[1] * 4 > 1 << 16:
                kinds.remove("1x1-kxk")
            if kinds:
                from gpd_surgery.branches import branch_shapes

                branches[key] = kinds
                for kind in kinds:
                    for name, bshape in branch_shapes(kind, tuple(tshape)).items():
                        tensors[f"m{k}." + name] = torch.zeros(bshape)
    assume(recipes)
    obj = {"format": "gpd-surgery/teacher", "version": 2, "ratio": 2.0, "seed": 0, "equal_shares": False,
           "source": {}, "spaces": spaces, "tensors": recipes, "report": {}, "branches": branches}
    return obj, tensors


def _ids(lay):
    return [lay] if isinstance(lay, int) else [i for p in next(iter(lay.values())) for i in _ids(p)]


@fuzz(20)
@given(case=huge_plans())
def test_huge_plans_stay_within_budget(tmp_path_factory, case):
    obj, tensors = case
    folder = tmp_path_factory.mktemp("huge")
    text = json.dumps(obj)
    path = folder / "t.safetensors"
    path.write_bytes(st_save(tensors, {gio.PLAN_KEY: text, gio.DIGEST_KEY: gio.plan_digest(text)}))
    for args in (["extract", path, "-o", folder / "s.safetensors"], ["inspect", path, "--json"]):
        code, out = run_limited(args, memory=1 << 30, seconds=20)
        assert code in (0, 2), (args[0], code, out[-2000:])
        event(f"{args[0]}: exit {code}")
        if code == 2:
            lines = out.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), out
