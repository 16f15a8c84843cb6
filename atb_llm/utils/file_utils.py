"""Path and file safety helpers (MindIE-LLM ``atb_llm.utils.file_utils`` contract).

Every file that ``atb_llm`` opens from a user-supplied path goes through these checks:
the path is normalised and restricted to a conservative character set, symlinks are
refused, files must not be writable by others, sizes and counts are bounded, and
files we create get owner-only permissions.

Differences from the framework (deliberate):
- ``standardize_path`` also accepts ``os.PathLike`` objects and rejects the empty path.
- ``safe_open`` adds ``O_NOFOLLOW`` so a symlink swapped in after the check is still refused.
"""

from __future__ import annotations

import os
import re
import stat
from typing import IO, Any

MAX_PATH_LENGTH = 4096
MAX_FILE_SIZE = 100 * 1024 * 1024
MAX_FILENUM_PER_DIR = 1024
MAX_LINENUM_PER_FILE = 10 * 1024 * 1024
FILE_PERMISSION = 0o600
CHECK_PERMISSION_ENV = "MINDIE_CHECK_INPUTFILES_PERMISSION"

_PATH_PATTERN = re.compile(r"[0-9a-zA-Z_./-]+")

# mode letters (without 'b'/'t') -> os.open flags
_MODE_FLAGS = {
    "r": os.O_RDONLY,
    "r+": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "x+": os.O_RDWR | os.O_CREAT | os.O_EXCL,
}


def standardize_path(path: str, max_path_length: int = MAX_PATH_LENGTH, check_link: bool = True) -> str:
    """Return the real path of ``path`` after validating it.

    Raises TypeError when the path is None or not a string, and ValueError when it is empty, longer than
    ``max_path_length``, a symlink (when ``check_link``), or when its real path has a
    character outside ``[0-9a-zA-Z_./-]``.
    """
    if path is None:
        raise TypeError("The path should not be None.")
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"The path should be a str, got {type(path).__name__}.")
    if not path:
        raise ValueError("The path should not be empty.")
    if len(path) > max_path_length:
        raise ValueError(f"The length of the path exceeds {max_path_length} characters.")
    if check_link and os.path.islink(path):
        raise ValueError(f"The path should not be a symbolic link: {path!r}.")
    real_path = os.path.realpath(path)
    if len(real_path) > max_path_length:
        raise ValueError(f"The length of the real path exceeds {max_path_length} characters.")
    if not _PATH_PATTERN.fullmatch(real_path):
        # Don't echo the path: it may contain the very characters we refuse to log.
        raise ValueError("The path contains characters outside [0-9a-zA-Z_./-].")
    return real_path


def check_path_permission(file_path: str, is_internal_file: bool = False) -> None:
    """Refuse a path owned by another user/group or writable by others.

    Skipped when the env var ``MINDIE_CHECK_INPUTFILES_PERMISSION`` is ``"0"``, unless
    ``is_internal_file`` (files the framework itself writes are always checked). Otherwise
    the effective uid must be root or the owner, or the file's gid must be our gid, and
    the file must not be writable by others. Raises FileNotFoundError or PermissionError.
    """
    # Read the variable on every call so that services and tests can toggle it.
    path = file_path
    if os.environ.get(CHECK_PERMISSION_ENV) == "0" and not is_internal_file:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"The path does not exist: {path!r}.") from e
    euid = os.geteuid()
    if not (euid == 0 or st.st_uid == euid or st.st_gid == os.getgid()):
        raise PermissionError(
            f"The path {path!r} is owned by uid {st.st_uid}/gid {st.st_gid}, not by the current user "
            f"(set {CHECK_PERMISSION_ENV}=0 to skip this check)."
        )
    if st.st_mode & stat.S_IWOTH:
        raise PermissionError(
            f"The path {path!r} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"remove o+w or set {CHECK_PERMISSION_ENV}=0 to skip this check."
        )


def _split_mode(mode: str) -> str:
    """Return the mode without 'b'/'t', validated against the supported modes."""
    if not isinstance(mode, str):
        raise TypeError(f"The file mode should be a str, got {type(mode).__name__}.")
    if ("b" in mode and "t" in mode) or mode.count("b") > 1 or mode.count("t") > 1:
        raise ValueError(f"Invalid file mode: {mode!r}.")
    base = "".join(ch for ch in mode if ch not in "bt")
    if base not in _MODE_FLAGS:
        raise ValueError(f"Unsupported file mode: {mode!r}.")
    return base


def check_file_safety(file_path: str, mode: str = "r", is_exist_ok: bool = True,
                      max_file_size: int = MAX_FILE_SIZE, is_check_file_size: bool = True) -> str:
    """Validate ``path`` for opening with ``mode``; return the standardized path.

    An existing file must be a regular file of at most ``max_file_size`` bytes and pass
    :func:`check_path_permission`; with ``is_exist_ok=False`` it is refused
    (FileExistsError); ``is_check_file_size=False`` skips the size limit. Read modes ('r', 'r+')
    need the file to exist (FileNotFoundError).
    A file that is about to be created needs its parent directory to exist and pass
    :func:`check_path_permission`.
    """
    real_path = standardize_path(file_path)
    base = _split_mode(mode)
    if os.path.exists(real_path):
        if not is_exist_ok:
            raise FileExistsError(f"The file already exists: {real_path!r}.")
        if not os.path.isfile(real_path):
            raise ValueError(f"The path is not a regular file: {real_path!r}.")
        size = os.path.getsize(real_path)
        if is_check_file_size and size > max_file_size:
            raise ValueError(
                f"The file {real_path!r} is {size} bytes, larger than the limit of {max_file_size} bytes."
            )
        check_path_permission(real_path)
    else:
        if base.startswith("r"):
            raise FileNotFoundError(f"The file does not exist: {real_path!r}.")
        parent = os.path.dirname(real_path)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"The parent directory does not exist: {parent!r}.")
        check_path_permission(parent)
    return real_path


def safe_open(file_path: str, mode: str = "r", encoding: str | None = None,
              permission_mode: int = FILE_PERMISSION, is_exist_ok: bool = True, **kwargs: Any) -> IO:
    """Open ``path`` after :func:`check_file_safety`, through ``os.open``.

    Files created by 'w'/'a'/'x' modes get ``permission_mode`` (0o600 by default, minus the
    umask); an existing file keeps its mode. ``is_exist_ok`` and ``max_file_size`` (in
    ``kwargs``) go to the safety check, the rest to :func:`os.fdopen`.
    """
    max_file_size = kwargs.pop("max_file_size", MAX_FILE_SIZE)
    real_path = check_file_safety(file_path, mode, is_exist_ok=is_exist_ok, max_file_size=max_file_size)
    flags = _MODE_FLAGS[_split_mode(mode)]
    # O_NOFOLLOW closes the window between the symlink check above and the open.
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(real_path, flags, permission_mode)
    try:
        return os.fdopen(fd, mode, encoding=encoding, **kwargs)
    except Exception:
        os.close(fd)
        raise


def safe_listdir(file_path: str, max_file_num: int = MAX_FILENUM_PER_DIR) -> list[str]:
    """``os.listdir`` of a standardized path; ValueError when it has more than ``max_file_num`` entries."""
    real_path = standardize_path(file_path)
    entries = os.listdir(real_path)
    if len(entries) > max_file_num:
        raise ValueError(
            f"The directory {real_path!r} has {len(entries)} entries, more than the limit of {max_file_num}."
        )
    return entries


def safe_readlines(file_obj: IO, max_line_num: int = MAX_LINENUM_PER_FILE) -> list:
    """Read all lines of an open file; ValueError when there are more than ``max_line_num``."""
    lines = []
    for line in file_obj:
        lines.append(line)
        # Fail as soon as the limit is passed, without reading the rest of a huge file.
        if len(lines) > max_line_num:
            raise ValueError(f"The file has more than the limit of {max_line_num} lines.")
    return lines
