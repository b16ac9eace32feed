"""Reading and writing teacher and student files: validated on the way in, atomic on the way out."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from typing import IO, Any, Callable

import torch
from torch import nn

from .errors import GPDError, PlanError, first_line
from .limits import MAX_HEADER
from .plan import DTYPE_NAMES, DTYPES, Plan, check_tensors

PLAN_KEY = "gpd_plan"
DIGEST_KEY = "gpd_plan_sha256"  # catches a plan edited or corrupted after `gpd expand` wrote it
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_ST_CODES = {DTYPES[v]: k for k, v in _ST_DTYPES.items()}
# safetensors lays tensors out by dtype (this order, reversed), then by name; gpd writes the same bytes.
_ST_ORDER = {k: i for i, k in enumerate(["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"])}
Header = dict[str, tuple[tuple[int, ...], str]]


def check_input_file(path: str, what: str = "file") -> None:
    if not os.path.exists(path):
        raise GPDError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise GPDError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise GPDError(f"{what} {path} is not readable")


def check_output(path: str, force: bool) -> None:
    """Refuse, before any work, an output that may not be written: a directory; an existing file that is not a
    regular one (a device, FIFO or socket: even with ``force``); an existing name without ``force`` (a dangling
    symlink is one too); a missing directory. A name taken later is refused by the write itself (``atomic_write``)."""
    if os.path.isdir(path):
        raise GPDError(f"output {path} is a directory")
    if os.path.exists(path) and not os.path.isfile(path):
        raise GPDError(f"output {path} is not a regular file (a device, FIFO or socket): gpd does not write to it")
    if os.path.lexists(path) and not force:
        raise _exists(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise GPDError(f"output directory {parent} does not exist")


# -- writing ------------------------------------------------------------------------------
def write_safetensors(f: IO[bytes], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                      durable: bool = False) -> None:
    """The safetensors format, streamed tensor by tensor: no second copy of the data in memory."""
    if sys.byteorder != "little":
        raise GPDError("safetensors files are little-endian: gpd cannot write them on this machine")
    for k, t in tensors.items():
        if t.dtype not in _ST_CODES:
            raise GPDError(f"tensor {k} has dtype {t.dtype}, which gpd does not store")
    items = sorted(tensors.items(), key=lambda kv: (-_ST_ORDER[_ST_CODES[kv[1].dtype]], kv[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(text)) + text)
    kick = _Writeback(f) if durable else None
    for _, t in items:
        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if kick is not None:
            kick()


class _Writeback:
    """Start the disk write of what a file has received every ``step`` bytes (Linux ``sync_file_range``,
    asynchronous): the data goes to disk while the rest is written, so the final ``fsync`` waits less and
    the writer is not throttled for a pile of dirty pages. Does nothing where the call is unavailable."""

    step = 16 << 20
    _call: Any = None

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.done = f, 0
        try:
            self.fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        if _Writeback._call is None:
            _Writeback._call = _sync_file_range()

    def __call__(self) -> None:
        if self.fd is None or not _Writeback._call:
            return
        try:
            end = self.f.tell()
        except (OSError, ValueError):
            return
        if end - self.done >= self.step:
            _Writeback._call(self.fd, self.done, end - self.done, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait
            self.done = end


def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return False


def _exists(path: str) -> GPDError:
    return GPDError(f"output {path} exists: pass --force to overwrite it")


def atomic_write(path: str, write: Callable[[IO[bytes]], None], *, durable: bool = False,
                 overwrite: bool = False) -> None:
    """Run ``write`` on a new file and give that file the name ``path`` only once it is complete: a failed or
    killed run leaves no partial output. On Linux the file has no name while it is written (O_TMPFILE), so
    even SIGKILL leaves nothing behind; elsewhere it is a temporary ``.gpd-*.tmp`` next to ``path``, removed
    on any error (but not on SIGKILL). Without ``overwrite`` the file gets its name by a hard link, which
    fails when the name exists: an output that appeared meanwhile (another run's) is refused, never replaced.
    With ``overwrite`` it is renamed over the old file, atomically.

    ``durable`` also survives a power cut: the data is on disk (``fsync``) before the file gets its name.
    That waits for the disk (about 1 s per GB here), which is why it is opt-in for outputs that can be made
    again (expand, extract) and on for training checkpoints."""
    check_output(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if not _save_unnamed(write, path, parent, durable, overwrite):
            _save_named(write, path, parent, durable, overwrite)
    except OSError as e:  # a full disk or a read-only directory is the user's to fix, not a bug
        raise GPDError(f"cannot write {path}: {e.strerror or e}") from None
    if durable:
        _fsync_dir(parent)


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None, *,
                durable: bool = False, overwrite: bool = False) -> None:
    """A safetensors file, written by ``atomic_write`` (which see for ``durable`` and ``overwrite``)."""
    atomic_write(path, lambda f: write_safetensors(f, tensors, metadata, durable), durable=durable,
                 overwrite=overwrite)


def _write(fd: int, write: Callable[[IO[bytes]], None], durable: bool) -> IO[bytes]:
    f = os.fdopen(fd, "wb")
    try:
        write(f)
        f.flush()
        if durable:
            os.fsync(f.fileno())  # the data is on disk before the file gets its name
    except BaseException:
        f.close()
        raise
    return f


def _save_unnamed(write: Callable[[IO[bytes]], None], path: str, parent: str, durable: bool,
                  overwrite: bool) -> bool:
    """Linux: write an unnamed file (O_TMPFILE) and name it only once complete, so that even SIGKILL
    leaves nothing behind. False where the system cannot (no O_TMPFILE, no /proc)."""
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY, 0o666)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return False
    tmp = None
    try:
        with _write(fd, write, durable) as f:
            try:
                tmp = _link(f.fileno(), path, parent, overwrite)
            except OSError:
                return False
        if tmp is not None:
            os.replace(tmp, path)
        return True
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _save_named(write: Callable[[IO[bytes]], None], path: str, parent: str, durable: bool,
                overwrite: bool) -> None:
    """A temporary file next to ``path``, removed on failure. Then renamed over ``path`` (``overwrite``), or
    hard-linked to it and removed: a link, unlike a rename, fails when the name was taken meanwhile."""
    fd, tmp = tempfile.mkstemp(prefix=".gpd-", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the permissions a plain open() gives, not mkstemp's 0600
        _write(fd, write, durable).close()
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone after the rename
            os.unlink(tmp)


def _link_new(tmp: str, path: str) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):  # FAT and some network file systems
            raise GPDError(f"cannot write {path}: this file system has no hard links, by which gpd makes sure not "
                           "to replace a file created meanwhile: pass --force to rename the output into place") from None
        raise


def _link(fd: int, path: str, parent: str, overwrite: bool) -> str | None:
    """Give the unnamed file a name: ``path`` itself when free (None returned). When taken: without
    ``overwrite`` a GPDError, with it a temporary name, to be renamed over ``path``."""
    # linkat(AT_SYMLINK_FOLLOW) through /proc; os.link only passes that flag when given a src_dir_fd.
    proc = os.open("/proc/self/fd", os.O_RDONLY)
    try:
        try:
            os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
            return None
        except FileExistsError:
            if not overwrite:
                raise _exists(path) from None
        tmp = os.path.join(parent, f".gpd-{os.urandom(6).hex()}.tmp")
        os.link(str(fd), tmp, src_dir_fd=proc, follow_symlinks=True)
        return tmp
    finally:
        os.close(proc)


def durable_replace(src: str, path: str) -> None:
    """Rename ``src`` over ``path`` (atomic), and make the rename survive a power cut."""
    try:
        os.replace(src, path)
    except OSError as e:
        raise GPDError(f"cannot write {path}: {e.strerror or e}") from None
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(parent: str) -> None:
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        return  # not possible everywhere (Windows); the rename is atomic either way
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def plan_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def save_teacher(path: str, plan: Plan, tensors: dict[str, torch.Tensor], *, durable: bool = False,
                 overwrite: bool = False) -> None:
    text = plan.to_json()
    atomic_save(tensors, path, {PLAN_KEY: text, DIGEST_KEY: plan_digest(text)}, durable=durable, overwrite=overwrite)


# -- reading ------------------------------------------------------------------------------
# Files are read with plain reads into tensors of the sizes the header states, never mapped: a file
# truncated while it is read is a short read (one clear error), not a SIGBUS, and nothing is allocated
# beyond what the file holds, since every tensor's bytes must lie inside it.


def _not_safetensors(path: str, head: bytes) -> PlanError:
    kind = ""
    if head.startswith(b"PK\x03\x04"):
        kind = ": it is a zip archive, as torch.save writes (load .pt weights with --weights)"
    elif head[:1] == b"\x80":
        kind = ": it is a pickle, as older torch.save writes (load .pt weights with --weights)"
    return PlanError(f"{path} is not a safetensors file{kind}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a name appears twice")
    return out


def _parse_header(path: str, f: IO[bytes]) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str, int]], int]:
    """Metadata, name -> (shape, dtype, start offset), and where the data begins; every entry is checked
    against the file's size, so that the data section is exactly the tensors' bytes, back to back."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise _not_safetensors(path, head)
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8) or n < 2:
        raise _not_safetensors(path, head + f.read(8))
    text = f.read(n)
    if len(text) != n:
        raise PlanError(f"{path} is truncated")
    try:
        obj = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise PlanError(f"{path} is not a safetensors file: its header is not JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise PlanError(f"{path} is not a safetensors file: its header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PlanError(f"{path} has malformed metadata")
    entries: dict[str, tuple[tuple[int, ...], str, int]] = {}
    spans = []
    for k, e in obj.items():
        where = f"tensor {k[:60]!r} in {path}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise PlanError(f"{where} has a malformed entry")
        dtype = _ST_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise PlanError(f"{where} has unsupported dtype {str(e['dtype'])[:20]}: gpd reads real "
                            f"{', '.join(_ST_DTYPES)} tensors")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= 16 and all(type(s) is int and 0 <= s < 2**62 for s in shape)):
            raise PlanError(f"{where} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise PlanError(f"{where} has malformed data offsets")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise PlanError(f"{where} has {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}")
        entries[k] = (tuple(shape), dtype, offsets[0])
        spans.append((offsets[0], offsets[1]))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise PlanError(f"{path} is not a valid safetensors file: its tensors overlap or leave gaps")
        end = b
    if 8 + n + end != size:
        raise PlanError(f"{path} is truncated" if 8 + n + end > size else
                        f"{path} has {size - 8 - n - end} bytes after its last tensor")
    return meta, entries, 8 + n


def _open(path: str) -> IO[bytes]:
    check_input_file(path)
    try:
        return open(path, "rb")
    except OSError as e:
        raise GPDError(f"cannot read {path}: {e.strerror or e}") from None


def read_header(path: str) -> tuple[dict[str, str], Header]:
    """Metadata and name -> (shape, dtype) of a safetensors file, without reading tensor data."""
    with _open(path) as f:
        meta, entries, _ = _parse_header(path, f)
    return meta, {k: (shape, dtype) for k, (shape, dtype, _) in entries.items()}


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read (not mapped) into memory of exactly the header's sizes."""
    if sys.byteorder != "little":
        raise GPDError("safetensors files are little-endian: gpd cannot read them on this machine")
    with _open(path) as f:
        _, entries, base = _parse_header(path, f)
        out: dict[str, torch.Tensor] = {}
        for k, (shape, dtype, start) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            t = torch.empty(shape, dtype=DTYPES[dtype])
            if t.numel():
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.seek(base + start)
                got = f.readinto(buf)
                if got != len(buf):
                    raise PlanError(f"{path} is truncated (it changed while it was read)")
            out[k] = t
    return {k: out[k] for k in entries}


def read_plan(path: str) -> tuple[Plan, Header, dict[str, str]]:
    """The validated plan of a teacher file, its tensor header and metadata (no tensor data read)."""
    meta, header = read_header(path)
    text = meta.get(PLAN_KEY)
    if text is not None:
        digest = meta.get(DIGEST_KEY)
        if digest is None:
            raise PlanError(f"{path} has a gpd plan but no {DIGEST_KEY} checksum: when saving a trained teacher, "
                            "copy both metadata entries of the file `gpd expand` wrote")
        if digest != plan_digest(text):
            raise PlanError(f"the plan in {path} does not match its checksum: the file was altered after `gpd expand`")
    try:
        plan = Plan.from_json(text)
        check_tensors(plan, header)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None
    return plan, header, meta


def load_teacher_file(path: str) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Plan and tensors of a teacher file, after checking that they agree exactly."""
    plan, header, _ = read_plan(path)
    tensors = read_tensors(path)
    if {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype)) for k, v in tensors.items()} != header:
        raise PlanError(f"{path} changed while it was read")
    return plan, tensors


def read_state(path: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or, weights-only (no code runs), from a torch.save file; with
    ``trust_pickle`` a file that weights-only loading refuses (a whole pickled model) is unpickled."""
    check_input_file(path, "weights file")
    if path.endswith(".safetensors"):
        read_header(path)  # validates dtypes and the header before any data is read
        state = read_tensors(path)
    else:
        state = _unpickle_state(path, trust_pickle)
    for k, v in state.items():
        # Loading would cast complex values to real and densify sparse ones: neither is what was saved.
        if v.is_complex():
            raise GPDError(f"weights {path}: tensor {k} is complex ({str(v.dtype)[6:]}): gpd works on real weights")
        if v.layout != torch.strided:
            raise GPDError(f"weights {path}: tensor {k} is sparse ({str(v.layout)[6:]}): save dense weights "
                           "(tensor.to_dense())")
    return state


def _unpickle_state(path: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. torch's note on validating sparse tensors, refused below anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message is a page long, with terminal escape codes: say in one line what the file is.
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a bare pickle
            raise GPDError(f"weights file {path} is neither a safetensors file nor a torch.save file") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not trust_pickle:
            name = found.group(1) if found else ""
            what = (f"it pickles {name}" + (" (a whole model saved with torch.save(model)?)"
                                            if name.rpartition(".")[2][:1].isupper() else "")
                    if found else "it holds more than tensors and plain containers")
            raise GPDError(f"weights file {path} is not a plain state dict: {what}, which a weights-only load "
                           "refuses, and unpickling it runs code from the file: pass --trust-pickle if you trust "
                           "it, or save model.state_dict() instead") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # unpickling can raise anything
            why = (": its model class was defined in the script that saved it (__main__) and cannot be imported "
                   "here; save model.state_dict() instead" if "__main__" in str(e2) else f": {type(e2).__name__}: "
                   f"{first_line(e2)}")
            raise GPDError(f"cannot unpickle weights file {path}{why}") from None
        if isinstance(state, nn.Module):
            state = state.state_dict()
    if isinstance(state, dict):
        for key in ("state_dict", "model"):  # a training checkpoint that holds the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise GPDError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str, *, trust_pickle: bool = False,
                 note: Callable[[str], None] | None = None) -> None:
    """Load ``path`` strictly into ``model``. A DistributedDataParallel state dict (every key under
    ``module.``) is unwrapped, and ``note`` (default: stderr) says so."""
    state = read_state(path, trust_pickle)
    own = model.state_dict()
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in own):
        state = {k[len(prefix):]: v for k, v in state.items()}
        (note or (lambda m: print(m, file=sys.stderr)))(
            f"note: every key in {path} starts with '{prefix}' (saved from DistributedDataParallel): stripped it")
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {list(state[k].shape)} but the model has {list(own[k].shape)}")
        raise GPDError(f"weights {path} do not fit the model: {'; '.join(parts)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a complex tensor for a real parameter
        raise GPDError(f"weights {path} do not fit the model: {first_line(e)}") from None
