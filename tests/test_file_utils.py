"""Tests for atb_llm.utils.file_utils (path/file safety) and atb_llm.utils.log."""

import io
import logging
import os

import pytest

from atb_llm.utils import file_utils
from atb_llm.utils.file_utils import (
    check_file_safety,
    check_path_permission,
    safe_listdir,
    safe_open,
    safe_readlines,
    standardize_path,
)

ENV = "MINDIE_CHECK_INPUTFILES_PERMISSION"


@pytest.fixture(autouse=True)
def _permission_check_on(monkeypatch):
    # The checks must be exercised whatever the developer's shell exports.
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---------------------------------------------------------------- standardize_path


def test_standardize_path_returns_realpath(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert standardize_path("sub/../sub/./") == str((tmp_path / "sub").resolve())
    assert standardize_path(tmp_path / "sub") == str((tmp_path / "sub").resolve())


def test_standardize_path_rejects_symlink(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("x")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        standardize_path(str(link))
    # check_link=False resolves it instead.
    assert standardize_path(str(link), check_link=False) == str(target.resolve())


@pytest.mark.parametrize("name", ["with space.txt", "dollar$.txt", "semi;colon", "uml\u00e4ut", "new\nline", "a*b"])
def test_standardize_path_rejects_bad_characters(tmp_path, name):
    with pytest.raises(ValueError, match="characters"):
        standardize_path(str(tmp_path / name))


def test_standardize_path_allows_charset(tmp_path):
    path = str(tmp_path / "Ok_name-1.2.txt")
    assert standardize_path(path) == os.path.realpath(path)


def test_standardize_path_length(tmp_path):
    path = str(tmp_path / "abc")
    assert standardize_path(path, max_path_length=len(path)) == os.path.realpath(path)
    with pytest.raises(ValueError, match="length"):
        standardize_path(path, max_path_length=len(path) - 1)
    with pytest.raises(ValueError, match="length"):
        standardize_path("/" + "a" * 4096)


def test_standardize_path_rejects_none_and_non_str():
    with pytest.raises(TypeError):
        standardize_path(None)
    with pytest.raises(TypeError):
        standardize_path(b"/tmp")
    with pytest.raises(ValueError):
        standardize_path("")


# ---------------------------------------------------------------- check_path_permission


def test_permission_private_file_passes(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("x")
    path.chmod(0o640)
    check_path_permission(str(path))


def test_permission_world_writable_rejected(tmp_path):
    path = tmp_path / "ww.txt"
    path.write_text("x")
    path.chmod(0o666)
    with pytest.raises(PermissionError, match="writable by others"):
        check_path_permission(str(path))


def test_permission_check_can_be_disabled(tmp_path, monkeypatch):
    path = tmp_path / "ww.txt"
    path.write_text("x")
    path.chmod(0o666)
    monkeypatch.setenv(ENV, "0")
    check_path_permission(str(path))
    # Any other value keeps the check on.
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(PermissionError):
        check_path_permission(str(path))


def test_permission_other_owner_rejected(tmp_path, monkeypatch):
    path = tmp_path / "theirs.txt"
    path.write_text("x")
    st = os.stat(path)
    # Pretend to be a non-root user that neither owns the file nor shares its group.
    monkeypatch.setattr(file_utils.os, "geteuid", lambda: st.st_uid + 12345)
    monkeypatch.setattr(file_utils.os, "getgid", lambda: st.st_gid + 12345)
    with pytest.raises(PermissionError, match="owned by"):
        check_path_permission(str(path))
    # Same group is enough.
    monkeypatch.setattr(file_utils.os, "getgid", lambda: st.st_gid)
    check_path_permission(str(path))


def test_permission_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        check_path_permission(str(tmp_path / "nope"))


# ---------------------------------------------------------------- check_file_safety


def test_file_safety_read_requires_existence(tmp_path):
    with pytest.raises(FileNotFoundError):
        check_file_safety(str(tmp_path / "missing.txt"), "r")
    with pytest.raises(FileNotFoundError):
        check_file_safety(str(tmp_path / "missing.txt"), "r+")
    # Write modes may create it.
    assert check_file_safety(str(tmp_path / "new.txt"), "w") == str(tmp_path.resolve() / "new.txt")


def test_file_safety_size_limit(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 100)
    check_file_safety(str(path), "r", max_file_size=100)
    with pytest.raises(ValueError, match="larger than"):
        check_file_safety(str(path), "r", max_file_size=99)


def test_file_safety_exist_ok_and_dirs(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("x")
    with pytest.raises(FileExistsError):
        check_file_safety(str(path), "w", is_exist_ok=False)
    with pytest.raises(ValueError, match="regular file"):
        check_file_safety(str(tmp_path), "r")


def test_file_safety_checks_permissions(tmp_path, monkeypatch):
    path = tmp_path / "ww.txt"
    path.write_text("x")
    path.chmod(0o666)
    with pytest.raises(PermissionError):
        check_file_safety(str(path), "r")
    wdir = tmp_path / "open_dir"
    wdir.mkdir()
    wdir.chmod(0o777)
    with pytest.raises(PermissionError):
        check_file_safety(str(wdir / "new.txt"), "w")
    monkeypatch.setenv(ENV, "0")
    check_file_safety(str(path), "r")
    check_file_safety(str(wdir / "new.txt"), "w")


# ---------------------------------------------------------------- safe_open


def test_safe_open_creates_private_file(tmp_path, umask_022):
    path = tmp_path / "out.txt"
    with safe_open(str(path), "w", encoding="utf-8") as f:
        f.write("hello\n")
    assert os.stat(path).st_mode & 0o777 == 0o600
    with safe_open(str(path), "a", encoding="utf-8") as f:
        f.write("world\n")
    with safe_open(str(path), "r", encoding="utf-8") as f:
        assert f.read() == "hello\nworld\n"
    with safe_open(str(path), "w", encoding="utf-8") as f:
        f.write("new")
    with safe_open(str(path), "rb") as f:
        assert f.read() == b"new"


def test_safe_open_append_creates_with_permission_mode(tmp_path, umask_022):
    path = tmp_path / "log.txt"
    with safe_open(str(path), "a", permission_mode=0o640) as f:
        f.write("x")
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_safe_open_rejects_symlink_and_bad_path(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("x")
    link = tmp_path / "l.txt"
    link.symlink_to(target)
    with pytest.raises(ValueError):
        safe_open(str(link), "r")
    with pytest.raises(ValueError):
        safe_open(str(link), "a")
    with pytest.raises(ValueError):
        safe_open(str(tmp_path / "bad name.txt"), "w")
    assert target.read_text() == "x"


def test_safe_open_rejects_bad_mode_and_missing(tmp_path):
    with pytest.raises(ValueError):
        safe_open(str(tmp_path / "x.txt"), "q")
    with pytest.raises(FileNotFoundError):
        safe_open(str(tmp_path / "x.txt"), "r")


def test_safe_open_size_limit_kwarg(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("0123456789")
    with pytest.raises(ValueError):
        safe_open(str(path), "r", max_file_size=5)


# ---------------------------------------------------------------- listdir / readlines


def test_safe_listdir_limit(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_text("")
    assert sorted(safe_listdir(str(tmp_path))) == [f"f{i}" for i in range(5)]
    assert len(safe_listdir(str(tmp_path), max_file_num=5)) == 5
    with pytest.raises(ValueError, match="more than"):
        safe_listdir(str(tmp_path), max_file_num=4)


def test_safe_readlines_limit():
    assert safe_readlines(io.StringIO("a\nb\nc\n"), max_line_num=3) == ["a\n", "b\n", "c\n"]
    with pytest.raises(ValueError, match="more than"):
        safe_readlines(io.StringIO("a\nb\nc\n"), max_line_num=2)


def test_constants():
    assert file_utils.MAX_PATH_LENGTH == 4096
    assert file_utils.MAX_FILE_SIZE == 100 * 1024 * 1024
    assert file_utils.MAX_FILENUM_PER_DIR == 1024
    assert file_utils.MAX_LINENUM_PER_FILE == 10 * 1024 * 1024


# ---------------------------------------------------------------- logging (atb_llm.utils.log)


@pytest.fixture
def log_stream():
    from atb_llm.utils.log import logger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_logger_accepts_error_code(log_stream):
    from atb_llm.utils.log import logger
    from atb_llm.utils.log.error_code import ErrorCode

    assert isinstance(logger, logging.Logger)
    assert logger.name == "atb_llm"
    logger.error("bad thing", ErrorCode.ATB_MODELS_PARAM_INVALID)
    logger.warning("careful %s", "now")
    logger.info("value %d", 3, extra={"x": 1})
    logger.error("with code and args %s", ErrorCode.ATB_MODELS_INTERNAL_ERROR, "ok")
    lines = log_stream.getvalue().splitlines()
    assert lines == [
        "ERROR [ATB_MODELS_PARAM_INVALID] bad thing",
        "WARNING careful now",
        "INFO value 3",
        "ERROR [ATB_MODELS_INTERNAL_ERROR] with code and args ok",
    ]


def test_error_codes():
    from atb_llm.utils.log.error_code import ErrorCode

    for name in ("ATB_MODELS_PARAM_OUT_OF_RANGE", "ATB_MODELS_MODEL_PARAM_JSON_INVALID",
                 "ATB_MODELS_EXECUTION_FAILURE", "ATB_MODELS_PARAM_INVALID",
                 "ATB_MODELS_INTERNAL_ERROR", "ATB_MODELS_OUT_OF_MEMORY"):
        assert isinstance(ErrorCode[name], str)


def test_print_log_and_filter(log_stream):
    from atb_llm.utils.log import logger, message_filter, print_log

    print_log(1, logger.info, "not on rank 1")
    print_log(0, logger.info, "line1\nline2\r\tend\x1b[31m", need_filter=True)
    assert log_stream.getvalue() == "INFO line1 line2  end [31m\n"
    assert len(message_filter("x" * 5000)) == 4096
    assert message_filter("a\u2028b\x00c") == "a b c"
