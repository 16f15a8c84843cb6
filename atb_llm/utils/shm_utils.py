"""Shared-memory transport for multimodal tensors (MindIE-LLM ``shm_utils`` contract).

A producer (router / input builder) writes a tensor into a POSIX shared-memory segment
(``/dev/shm/psm_*``) and puts two int64 codes into the token stream: the segment name
and the tensor shape, each packed into a negative int64. The consumer (the model)
decodes both and copies the tensor out. Segment names are appended to a save file so
that :func:`release_shared_memory` can unlink them when the request ends.

Bit layouts (identical to the framework, so codes are interchangeable):

* Name code: the name without the ``psm_`` prefix, L characters of
  ``CHARSET``; L in bits 58-62, character i's charset index (5 bits) at bit offset
  ``53 - 5*i``, checksum ``(sum of indices % 16) & 0b111`` in bits 0-2; negated.
* Shape code: ndim (1..5) in bits 60-62; the dimensions in fields written from bit 60
  downward with widths ``_SHAPE_BITS[ndim]`` (57 bits in all, so the last field ends at
  bit 3); each value must be at most ``2 ** (width - 1)``; checksum
  ``popcount(value) % 3`` in bits 0-2; negated.

Python's ``SharedMemory`` registers every segment it creates *or attaches to* with the
``multiprocessing`` resource tracker, which unlinks (and warns about) whatever is still
registered when the process exits. Here the save file and :func:`release_shared_memory`
own the lifetime, so each registration is undone straight away (``track=False`` on
Python 3.13+), and our unlink talks to the OS directly.
"""

from __future__ import annotations

import math
import operator
import os
import secrets
import sys
import threading
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch

from atb_llm.utils.file_utils import safe_open, standardize_path

try:  # the C module SharedMemory itself uses on POSIX; absent on Windows
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX
    _posixshmem = None

CHARSET = "0123456789abcdefpsmnwABCDEF"
SHM_NAME_PREFIX = shared_memory._SHM_NAME_PREFIX.lstrip("/")  # "psm_" on POSIX
SHM_NAME_MAX_LENGTH = 14
MAX_SHM_SIZE = 1e9

_NAME_LEN_SHIFT = 58
_NAME_FIRST_CHAR_SHIFT = 53
_CHAR_BITS = 5
_NDIM_SHIFT = 60
_SHAPE_BITS = {
    1: (57,),
    2: (29, 28),
    3: (19, 19, 19),
    4: (18, 3, 18, 18),
    5: (13, 13, 3, 14, 14),
}
_INT63_LIMIT = 1 << 63

_TRACK_PARAM = sys.version_info >= (3, 13)
# Register/unregister with the tracker in pairs: the tracker keeps a *set* of names, so
# two overlapping attaches to one name in two threads would unregister twice.
_TRACKER_LOCK = threading.Lock()

IntLike = int | np.integer | torch.Tensor


def _new_shm_name() -> str:
    """A fresh segment name as ``SharedMemory`` picks it: ``psm_`` and 8 hex digits (all in ``CHARSET``)."""
    return SHM_NAME_PREFIX + secrets.token_hex(4)


def _shared_memory(name: str | None = None, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """``SharedMemory(...)`` with its resource-tracker registration undone (``track=False`` on 3.13+)."""
    if _TRACK_PARAM:
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    with _TRACKER_LOCK:
        shm = shared_memory.SharedMemory(name=name, create=create, size=size)
        if os.name == "posix":
            try:
                # pylint: disable=protected-access
                resource_tracker.unregister(shm._name, "shared_memory")
            except BaseException:
                shm.close()
                raise
    return shm


def _remove_segment(name: str) -> None:
    """Best-effort unlink of a segment by name (no handle needed); never raises."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except OSError:
        pass


def _open_shm(name: str | None = None, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """Create or attach to a segment without leaving it registered with the resource tracker.

    Creating (POSIX): the segment is made here with ``O_CREAT | O_EXCL`` (so it is certainly ours), sized,
    and then attached; if anything fails once it exists (sizing, mapping, the resource tracker, an
    interrupt), it is unlinked again before the error propagates. ``SharedMemory(create=True)`` itself
    would leave it behind when, e.g., the resource tracker cannot start.
    """
    if not create or _posixshmem is None:
        return _shared_memory(name=name, create=create, size=size)
    for _ in range(100):
        candidate = name if name is not None else _new_shm_name()
        try:
            fd = _posixshmem.shm_open("/" + candidate, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        except FileExistsError:
            if name is not None:
                raise
            continue
        try:
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            return _shared_memory(name=candidate)
        except BaseException:
            _remove_segment(candidate)
            raise
    raise FileExistsError("no free shared memory name after 100 tries")


def _unlink_shm(shm: shared_memory.SharedMemory) -> None:
    """Remove the segment's name; bypasses ``SharedMemory.unlink`` (it would unregister again)."""
    if _TRACK_PARAM or _posixshmem is None:
        shm.unlink()
    else:
        # pylint: disable=protected-access
        _posixshmem.shm_unlink(shm._name)


def _to_int(value: IntLike, what: str) -> int:
    """Accept a Python/numpy int or a one-element integer torch tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise TypeError(f"The {what} must be a single integer, got a tensor of shape {tuple(value.shape)} "
                             f"and dtype {value.dtype}.")
        return int(value.item())
    if isinstance(value, bool):
        raise TypeError(f"The {what} must be an integer, got bool.")
    try:
        return operator.index(value)
    except TypeError as e:
        raise TypeError(f"The {what} must be an integer, got {type(value).__name__}.") from e


def create_shm(size: int, shm_name_save_path: str) -> shared_memory.SharedMemory:
    """Create a segment of ``size`` bytes and append its name to ``shm_name_save_path``.

    The save file is opened with ``file_utils.safe_open(..., 'a')`` (0o600, path rules).
    The caller writes into ``shm.buf`` and closes its handle; the segment stays until
    :func:`release_shared_memory`. Raises ValueError for a size that is not an int in
    (0, MAX_SHM_SIZE] and RuntimeError when creating the segment or recording its name
    fails; on every error after the segment exists (sizing, mapping, the resource tracker,
    the save file, an interrupt) it is closed and unlinked again before the error propagates.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"The shared memory size must be an int, got {type(size).__name__}.")
    size = int(size)
    if size <= 0:
        raise ValueError(f"The shared memory size must be positive, got {size}.")
    if size > MAX_SHM_SIZE:
        raise ValueError(f"The shared memory size {size} exceeds the limit of {int(MAX_SHM_SIZE)} bytes.")
    try:
        shm = _open_shm(create=True, size=size)
    except Exception as e:
        raise RuntimeError(f"Failed to create shared memory of {size} bytes: {e}") from e
    try:
        with safe_open(shm_name_save_path, "a", encoding="utf-8") as fw:
            fw.write(f"{shm.name}\n")
    except BaseException as e:
        # Nobody would ever release a segment whose name was not recorded: remove it on every error
        # (an interrupt too), then report.
        try:
            shm.close()
        except Exception:  # pylint: disable=broad-except
            pass
        try:
            _unlink_shm(shm)
        except OSError:
            pass
        if isinstance(e, Exception):
            raise RuntimeError(f"Failed to record shared memory name in the save file: {e}") from e
        raise
    return shm


def release_shared_memory(file_path: str) -> None:
    """Close and unlink every segment named in the save file ``path``, then remove the file.

    Names are read one per line; blank lines and segments that no longer exist are
    skipped. The file is first renamed aside, so names appended by a concurrent
    producer go to a fresh file instead of being lost, and is then **removed** (not
    truncated). A missing save file means nothing to release and is not an error
    (the framework raises). Other failures raise RuntimeError after every name was tried.
    """
    real_path = standardize_path(file_path)
    if not os.path.exists(real_path):
        return
    releasing = f"{real_path}.releasing.{os.getpid()}.{threading.get_ident()}"
    try:
        os.replace(real_path, releasing)
    except FileNotFoundError:
        return  # released concurrently
    errors = []
    try:
        with safe_open(releasing, "r", encoding="utf-8") as fr:
            names = [line.strip() for line in fr]
        for name in names:
            if not name:
                continue
            try:
                shm = _open_shm(name=name)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:  # keep going: one bad name must not leak the rest
                errors.append(f"{name}: {e}")
                continue
            shm.close()
            try:
                _unlink_shm(shm)
            except FileNotFoundError:
                pass  # unlinked by someone else in between
            except OSError as e:
                errors.append(f"{name}: {e}")
    except (OSError, ValueError, TypeError) as e:
        errors.append(str(e))
    finally:
        try:
            os.remove(releasing)
        except FileNotFoundError:
            pass
    if errors:
        raise RuntimeError(f"Failed to release shared memory: {'; '.join(errors)}")


def encode_shm_name_to_int64(name: str) -> int:
    """Pack a segment name (at most 14 chars incl. ``psm_``) into a negative int64.

    Raises ValueError for a name that is too long, a character outside ``CHARSET``,
    or more than 11 characters after the prefix (no bits left for them).
    """
    if not isinstance(name, str):
        raise TypeError(f"The shared memory name must be a str, got {type(name).__name__}.")
    if len(name) > SHM_NAME_MAX_LENGTH:
        raise ValueError(f"The shared memory name {name!r} is longer than {SHM_NAME_MAX_LENGTH} characters.")
    body = name.replace(SHM_NAME_PREFIX, "")
    value = (len(body) & 0b11111) << _NAME_LEN_SHIFT
    idx_sum = 0
    for i, char in enumerate(body):
        shift = _NAME_FIRST_CHAR_SHIFT - _CHAR_BITS * i
        if shift < 0:
            raise ValueError(f"The shared memory name {name!r} has too many characters to encode.")
        idx = CHARSET.find(char)
        if idx < 0:
            raise ValueError(f"The shared memory name {name!r} has a character {char!r} outside {CHARSET!r}.")
        value |= idx << shift
        idx_sum += idx
    value |= (idx_sum % 16) & 0b111
    return -value


def decode_shm_name_from_int64(encoded_value: IntLike) -> str:
    """Inverse of :func:`encode_shm_name_to_int64`; accepts an int or a scalar tensor.

    Raises ValueError for a code that is not a valid negated name code or whose checksum
    does not match.
    """
    value = -_to_int(encoded_value, "shared memory name code")
    if not 0 <= value < _INT63_LIMIT:
        raise ValueError(f"{-value} is not a shared memory name code (expected a value in (-2**63, 0]).")
    length = (value >> _NAME_LEN_SHIFT) & 0b11111
    chars = []
    idx_sum = 0
    for i in range(length):
        shift = _NAME_FIRST_CHAR_SHIFT - _CHAR_BITS * i
        if shift < 0:
            raise ValueError(f"{-value} is not a shared memory name code (length {length} is too large).")
        idx = (value >> shift) & 0b11111
        if idx >= len(CHARSET):
            raise ValueError(f"{-value} is not a shared memory name code (character index {idx}).")
        chars.append(CHARSET[idx])
        idx_sum += idx
    if (value & 0b111) != (idx_sum % 16) & 0b111:
        raise ValueError(f"Checksum mismatch in shared memory name code {-value}.")
    return SHM_NAME_PREFIX + "".join(chars)


def encode_shape_to_int64(shape: Sequence[int]) -> int:
    """Pack a shape of 1 to 5 non-negative dims into a negative int64.

    Each dim must be at most ``2 ** (width - 1)`` for its field (e.g. 4 for the 3-bit
    second field of a 4-D shape); otherwise ValueError.
    """
    try:
        dims = [_to_int(d, "dimension") for d in shape]
    except TypeError as e:
        raise ValueError(f"The shape must be a sequence of ints, got {type(shape).__name__}.") from e
    ndim = len(dims)
    if ndim not in _SHAPE_BITS:
        raise ValueError(f"The shape must have 1 to 5 dimensions, got {ndim}: {dims}.")
    value = (ndim & 0b111) << _NDIM_SHIFT
    offset = _NDIM_SHIFT
    for i, (dim, bits) in enumerate(zip(dims, _SHAPE_BITS[ndim])):
        if dim < 0:
            raise ValueError(f"Dimension {i} of shape {dims} is negative.")
        if dim > 1 << (bits - 1):
            raise ValueError(
                f"Dimension {i} of shape {dims} is {dim}, over the limit of {1 << (bits - 1)} for a {ndim}-D shape."
            )
        offset -= bits
        value |= (dim & ((1 << bits) - 1)) << offset
    value |= value.bit_count() % 3
    return -value


def decode_shape_from_int64(encoded_value: IntLike) -> list[int]:
    """Inverse of :func:`encode_shape_to_int64`; returns a list. ValueError on a bad code."""
    value = -_to_int(encoded_value, "shape code")
    if not 0 <= value < _INT63_LIMIT:
        raise ValueError(f"{-value} is not a shape code (expected a value in (-2**63, 0]).")
    if (value & 0b111) != (value >> 3).bit_count() % 3:
        raise ValueError(f"Checksum mismatch in shape code {-value}.")
    ndim = (value >> _NDIM_SHIFT) & 0b111
    if ndim not in _SHAPE_BITS:
        raise ValueError(f"{-value} is not a shape code (ndim {ndim}).")
    dims = []
    offset = _NDIM_SHIFT
    for bits in _SHAPE_BITS[ndim]:
        offset -= bits
        dims.append((value >> offset) & ((1 << bits) - 1))
    return dims


_TORCH_TO_NUMPY = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}


def _to_numpy_dtype(dtype) -> np.dtype:
    """Map a numpy dtype (or anything ``np.dtype`` accepts) or a torch dtype; ValueError if neither."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_TO_NUMPY:
            raise ValueError(f"Unsupported dtype for shared memory data: {dtype}.")
        return np.dtype(_TORCH_TO_NUMPY[dtype])
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"Unsupported dtype for shared memory data: {dtype!r}.") from e


def get_data_from_shm(shm_name_value: IntLike, shape_value: IntLike, dtype=np.float32,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Copy the tensor that the two codes describe out of shared memory onto ``device``.

    ``dtype`` is a numpy dtype (a torch dtype is mapped) and must match the producer's.
    Unlike the framework, which logs a warning and returns an uninitialised tensor,
    this raises ValueError (bad codes, dtype, or a segment too small for the shape) or
    RuntimeError (segment missing or unreadable), and it always closes its own handle
    to the segment after copying. The segment itself is not unlinked.
    """
    try:
        name = decode_shm_name_from_int64(shm_name_value)
        shape = decode_shape_from_int64(shape_value)
    except TypeError as e:
        # The caller treats ValueError/RuntimeError as a bad request; a wrong code type is one too.
        raise ValueError(str(e)) from e
    np_dtype = _to_numpy_dtype(dtype)
    nbytes = math.prod(shape) * np_dtype.itemsize
    try:
        shm = _open_shm(name=name)
    except FileNotFoundError as e:
        raise RuntimeError(
            f"Shared memory segment {name!r} does not exist (already released, or a wrong name code)."
        ) from e
    except Exception as e:
        raise RuntimeError(f"Failed to attach to shared memory segment {name!r}: {e}") from e
    try:
        if nbytes > shm.size:
            raise ValueError(
                f"Shared memory segment {name!r} has {shm.size} bytes, too small for shape {shape} "
                f"of {np_dtype} ({nbytes} bytes)."
            )
        view = np.ndarray(shape, dtype=np_dtype, buffer=shm.buf)
        data = view.copy()
        # The view exports shm.buf; it must be gone before close() or close() raises BufferError.
        del view
    finally:
        shm.close()
    return torch.from_numpy(data).to(device)
