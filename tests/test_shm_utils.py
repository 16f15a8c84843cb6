"""Tests for atb_llm.utils.shm_utils: code layouts, cross-process transport, cleanup."""

import glob
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import (
    write_pixels_to_shm,
)
from atb_llm.utils import shm_utils
from atb_llm.utils.shm_utils import (
    MAX_SHM_SIZE,
    SHM_NAME_MAX_LENGTH,
    SHM_NAME_PREFIX,
    create_shm,
    decode_shape_from_int64,
    decode_shm_name_from_int64,
    encode_shape_to_int64,
    encode_shm_name_to_int64,
    get_data_from_shm,
    release_shared_memory,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHM_DIR = "/dev/shm"
# Field widths of the shape layout, restated here rather than imported so a wrong table
# in the implementation cannot make the tests agree with it.
SHAPE_BITS = {1: [57], 2: [29, 28], 3: [19, 19, 19], 4: [18, 3, 18, 18], 5: [13, 13, 3, 14, 14]}
CHARSET = "0123456789abcdefpsmnwABCDEF"

pytestmark = [pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs POSIX shared memory in /dev/shm"),
              pytest.mark.parity]


def _shm_names() -> set:
    return {os.path.basename(p) for p in glob.glob(os.path.join(SHM_DIR, SHM_NAME_PREFIX + "*"))}


def _run_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (its own resource tracker) that can import atb_llm."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture
def save_path(tmp_path):
    path = tmp_path / "shm_names.txt"
    yield str(path)
    # Never leave segments behind, whatever the test did.
    release_shared_memory(str(path))


# ---------------------------------------------------------------- constants


def test_constants():
    assert SHM_NAME_PREFIX == "psm_"
    assert SHM_NAME_MAX_LENGTH == 14
    assert MAX_SHM_SIZE == 1e9
    assert shm_utils.CHARSET == CHARSET
    assert len(CHARSET) == 27


# ---------------------------------------------------------------- name codes


def test_name_code_hand_computed():
    # body "0a1b" -> L=4, indices 0, 10, 1, 11 at offsets 53, 48, 43, 38; sum 22 -> 22 % 16 = 6 -> & 7 = 6
    expected = -((4 << 58) | (0 << 53) | (10 << 48) | (1 << 43) | (11 << 38) | 6)
    assert expected == -1155748074123952134
    assert encode_shm_name_to_int64("psm_0a1b") == expected
    assert decode_shm_name_from_int64(expected) == "psm_0a1b"


def test_name_code_hand_computed_checksum_wraps():
    # body "FFFF": index of 'F' is 26, sum 104 -> 104 % 16 = 8 -> & 7 = 0
    expected = -((4 << 58) | (26 << 53) | (26 << 48) | (26 << 43) | (26 << 38) | 0)
    assert encode_shm_name_to_int64("psm_FFFF") == expected


@pytest.mark.parametrize(
    "name",
    ["psm_0123abcd", "psm_deadbeef", "psm_pswnAB", "psm_CDEF0", "psm_", "psm_0", "0123456789a", "psm_FFFFFFFFFF"],
)
def test_name_round_trip(name):
    code = encode_shm_name_to_int64(name)
    assert code <= 0
    assert code > -(1 << 63)  # fits a signed int64
    expected = name if name.startswith(SHM_NAME_PREFIX) else SHM_NAME_PREFIX + name
    assert decode_shm_name_from_int64(code) == expected
    assert decode_shm_name_from_int64(torch.tensor(code, dtype=torch.int64)) == expected
    assert decode_shm_name_from_int64(np.int64(code)) == expected


def test_name_round_trip_random():
    rng = random.Random(1234)
    for _ in range(500):
        body = "".join(rng.choice(CHARSET) for _ in range(rng.randint(1, 10)))
        name = SHM_NAME_PREFIX + body
        code = encode_shm_name_to_int64(name)
        assert code < 0
        assert decode_shm_name_from_int64(code) == name


def test_name_too_long_raises():
    with pytest.raises(ValueError, match="14"):
        encode_shm_name_to_int64("psm_0123456789a")  # 15 characters
    # Length is checked before the prefix is removed.
    encode_shm_name_to_int64("psm_0123456789")


def test_name_too_many_chars_without_prefix_raises():
    # 12 characters after (absent) prefix: the 12th would need a negative shift.
    with pytest.raises(ValueError):
        encode_shm_name_to_int64("0123456789ab")


@pytest.mark.parametrize("name", ["psm_xyz", "psm_0a-1", "psm_GG", "psm_ab c"])
def test_name_char_outside_charset_raises(name):
    with pytest.raises(ValueError, match="outside"):
        encode_shm_name_to_int64(name)


def test_name_checksum_mismatch_raises():
    code = encode_shm_name_to_int64("psm_0123abcd")
    with pytest.raises(ValueError, match="[Cc]hecksum"):
        decode_shm_name_from_int64(-((-code) ^ 0b001))
    # Flip the lowest bit of the first character index: the index sum changes by 1.
    with pytest.raises(ValueError, match="[Cc]hecksum"):
        decode_shm_name_from_int64(-((-code) ^ (1 << 53)))


def test_name_decode_rejects_non_negated_and_bad_types():
    code = encode_shm_name_to_int64("psm_0123abcd")
    with pytest.raises(ValueError):
        decode_shm_name_from_int64(-code)
    with pytest.raises(TypeError):
        decode_shm_name_from_int64(1.5)
    with pytest.raises(TypeError):
        decode_shm_name_from_int64(torch.tensor([code, code]))


# ---------------------------------------------------------------- shape codes


def _hand_shape_code(shape):
    """The layout, written out independently of the implementation."""
    value = len(shape) << 60
    offset = 60
    for dim, bits in zip(shape, SHAPE_BITS[len(shape)]):
        offset -= bits
        value |= dim << offset
    assert offset == 3
    checksum = value.bit_count() % 3
    return -(value | checksum)


def test_shape_code_hand_computed():
    # 3-D, 19-bit fields at offsets 41, 22, 3; popcount = 2 (ndim 3) + 1 + 2 + 2 = 7 -> 7 % 3 = 1
    expected = -((3 << 60) | (2 << 41) | (3 << 22) | (5 << 3) | 1)
    assert expected == -3458768911879634985
    assert encode_shape_to_int64([2, 3, 5]) == expected
    assert decode_shape_from_int64(expected) == [2, 3, 5]


def test_shape_code_hand_computed_4d():
    # 4-D offsets: 60-18=42, 42-3=39, 39-18=21, 21-18=3
    value = (4 << 60) | (1 << 42) | (3 << 39) | (224 << 21) | (224 << 3)
    popcount = 1 + 1 + 2 + 3 + 3
    assert encode_shape_to_int64((1, 3, 224, 224)) == -(value | (popcount % 3))


SHAPES = [
    [1], [7], [1 << 56],
    [3, 5], [1 << 28, 1 << 27], [0, 4],
    [1, 2, 3], [1 << 18, 1 << 18, 1 << 18], [13, 224, 224],
    [2, 3, 224, 224], [1 << 17, 4, 1 << 17, 1 << 17], [5, 0, 7, 9],
    [1, 2, 3, 4, 5], [1 << 12, 1 << 12, 4, 1 << 13, 1 << 13], [24, 3, 2, 14, 14],
]


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_round_trip(shape):
    code = encode_shape_to_int64(shape)
    assert -(1 << 63) < code < 0
    assert code == _hand_shape_code(shape)
    decoded = decode_shape_from_int64(code)
    assert isinstance(decoded, list)
    assert decoded == list(shape)
    assert decode_shape_from_int64(torch.tensor(code)) == list(shape)
    assert encode_shape_to_int64(torch.Size(shape)) == code
    assert encode_shape_to_int64(tuple(np.int64(d) for d in shape)) == code


def test_shape_round_trip_random():
    rng = random.Random(99)
    for _ in range(500):
        ndim = rng.randint(1, 5)
        shape = [rng.randint(0, 1 << (bits - 1)) for bits in SHAPE_BITS[ndim]]
        code = encode_shape_to_int64(shape)
        assert code == _hand_shape_code(shape)
        assert decode_shape_from_int64(code) == shape


@pytest.mark.parametrize("ndim", sorted(SHAPE_BITS))
def test_shape_field_limits(ndim):
    bits = SHAPE_BITS[ndim]
    for i, width in enumerate(bits):
        shape = [1] * ndim
        shape[i] = 1 << (width - 1)  # the largest accepted value
        assert decode_shape_from_int64(encode_shape_to_int64(shape)) == shape
        shape[i] += 1
        with pytest.raises(ValueError):
            encode_shape_to_int64(shape)


def test_shape_3bit_field_of_4d_accepts_at_most_4():
    assert decode_shape_from_int64(encode_shape_to_int64([1, 4, 1, 1])) == [1, 4, 1, 1]
    with pytest.raises(ValueError):
        encode_shape_to_int64([1, 5, 1, 1])


@pytest.mark.parametrize("shape", [[], [1, 2, 3, 4, 5, 6]])
def test_shape_bad_ndim_raises(shape):
    with pytest.raises(ValueError):
        encode_shape_to_int64(shape)


def test_shape_negative_dim_raises():
    with pytest.raises(ValueError):
        encode_shape_to_int64([2, -1])


def test_shape_checksum_mismatch_raises():
    code = encode_shape_to_int64([2, 3, 224, 224])
    # Any single flipped bit above bit 2 moves the popcount by one, so mod 3 changes.
    for bit in (3, 10, 30, 45, 60):
        with pytest.raises(ValueError, match="[Cc]hecksum"):
            decode_shape_from_int64(-((-code) ^ (1 << bit)))
    with pytest.raises(ValueError, match="[Cc]hecksum"):
        decode_shape_from_int64(-((-code) ^ 0b011))


def test_shape_decode_rejects_non_negated():
    code = encode_shape_to_int64([4, 4])
    with pytest.raises(ValueError):
        decode_shape_from_int64(-code)


# ---------------------------------------------------------------- segments


def test_create_shm_validates_size(save_path):
    for bad in (0, -1, int(MAX_SHM_SIZE) + 1):
        with pytest.raises(ValueError):
            create_shm(bad, save_path)
    with pytest.raises(TypeError):
        create_shm(10.0, save_path)
    assert not os.path.exists(save_path)


def test_create_shm_records_name_with_private_file(save_path):
    shm = create_shm(64, save_path)
    try:
        assert shm.name.startswith(SHM_NAME_PREFIX)
        assert len(shm.name) <= SHM_NAME_MAX_LENGTH
        assert shm.size >= 64
        with open(save_path, encoding="utf-8") as f:
            assert f.read() == shm.name + "\n"
        assert os.stat(save_path).st_mode & 0o777 == 0o600
    finally:
        shm.close()


@pytest.fixture
def opened_names(monkeypatch):
    """Names of every segment shm_utils creates during the test (other processes may use /dev/shm too)."""
    names = []
    real_open = shm_utils._open_shm

    def recording_open(name=None, create=False, size=0):
        shm = real_open(name=name, create=create, size=size)
        if create:
            names.append(shm.name)
        return shm

    monkeypatch.setattr(shm_utils, "_open_shm", recording_open)
    return names


def test_create_shm_bad_save_path_does_not_leak(tmp_path, opened_names):
    target = tmp_path / "real.txt"
    target.write_text("")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(RuntimeError, match="save file"):
        create_shm(16, str(link))
    assert len(opened_names) == 1
    assert opened_names[0] not in _shm_names()
    assert target.read_text() == ""


def test_write_then_read_same_process(save_path):
    data = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 7
    name_code, shape_code = write_pixels_to_shm(data, save_path)
    assert name_code < 0 and shape_code < 0
    assert decode_shape_from_int64(shape_code) == [2, 3, 4]
    out = get_data_from_shm(name_code, shape_code, np.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, data.float())
    # torch dtype and tensor codes are accepted too
    out2 = get_data_from_shm(torch.tensor(name_code), torch.tensor(shape_code), torch.float32)
    torch.testing.assert_close(out2, data.float())


def test_get_data_closes_its_handle(save_path):
    name_code, shape_code = write_pixels_to_shm(np.ones((4, 4)), save_path)
    name = decode_shm_name_from_int64(name_code)
    get_data_from_shm(name_code, shape_code)
    with open("/proc/self/maps", encoding="utf-8") as f:
        assert name not in f.read()


def test_get_data_segment_too_small_raises(save_path):
    name_code, _ = write_pixels_to_shm(np.ones(4), save_path)
    with pytest.raises(ValueError, match="too small"):
        get_data_from_shm(name_code, encode_shape_to_int64([1000]))


def test_get_data_bad_codes_raise(save_path):
    name_code, shape_code = write_pixels_to_shm(np.ones(4), save_path)
    # Flip the lowest checksum bit of the magnitude: always a checksum mismatch, whatever the random name.
    with pytest.raises(ValueError):
        get_data_from_shm(-((-name_code) ^ 1), shape_code)
    with pytest.raises(ValueError):
        get_data_from_shm(name_code, -((-shape_code) ^ 1))
    with pytest.raises(ValueError):
        get_data_from_shm(1.5, shape_code)
    with pytest.raises(ValueError):
        get_data_from_shm(name_code, shape_code, dtype="not-a-dtype")


def test_write_rejects_unencodable_shape_without_leaking(save_path, opened_names):
    with pytest.raises(ValueError):
        write_pixels_to_shm(np.zeros((1, 1, 1, 1, 1, 1)), save_path)
    with pytest.raises(ValueError):
        write_pixels_to_shm(np.zeros((1, 5, 1, 1)), save_path)
    assert opened_names == []  # the shape is checked before any segment exists
    assert not os.path.exists(save_path)


def test_write_empty_and_torch_half(save_path):
    name_code, shape_code = write_pixels_to_shm(torch.zeros(0, 3), save_path)
    assert get_data_from_shm(name_code, shape_code).shape == (0, 3)
    half = torch.tensor([[1.5, -2.25]], dtype=torch.float16)
    name_code, shape_code = write_pixels_to_shm(half, save_path)
    torch.testing.assert_close(get_data_from_shm(name_code, shape_code), half.float())


def test_cross_process_child_reads_parent_data(save_path, tmp_path):
    data = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    name_code, shape_code = write_pixels_to_shm(data, save_path)
    out_file = tmp_path / "child.npy"
    proc = _run_python(f"""
        import numpy as np
        from atb_llm.utils.shm_utils import get_data_from_shm
        t = get_data_from_shm({name_code}, {shape_code}, np.float32)
        np.save({str(out_file)!r}, t.numpy())
    """)
    assert proc.returncode == 0, proc.stderr
    assert "resource_tracker" not in proc.stderr
    np.testing.assert_array_equal(np.load(out_file), data)
    # The child's exit must not have unlinked the segment: we can still read it.
    np.testing.assert_array_equal(get_data_from_shm(name_code, shape_code).numpy(), data)


def test_cross_process_parent_reads_child_data(tmp_path):
    """The producer exits before the consumer reads: its exit must not unlink the segment."""
    save = tmp_path / "names.txt"
    proc = _run_python(f"""
        import numpy as np
        from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import write_pixels_to_shm
        data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
        print(*write_pixels_to_shm(data, {str(save)!r}))
    """)
    try:
        assert proc.returncode == 0, proc.stderr
        assert "resource_tracker" not in proc.stderr
        assert "leaked" not in proc.stderr
        name_code, shape_code = (int(v) for v in proc.stdout.split())
        out = get_data_from_shm(name_code, shape_code)
        np.testing.assert_array_equal(out.numpy(), np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5))
    finally:
        release_shared_memory(str(save))


def test_release_in_separate_process_is_quiet(tmp_path):
    save = tmp_path / "names.txt"
    name_code, _ = write_pixels_to_shm(np.ones(8), str(save))
    name = decode_shm_name_from_int64(name_code)
    proc = _run_python(f"""
        from atb_llm.utils.shm_utils import release_shared_memory
        release_shared_memory({str(save)!r})
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert name not in _shm_names()


def test_release_removes_every_segment(save_path):
    before = _shm_names()
    created = set()
    for i in range(5):
        name_code, _ = write_pixels_to_shm(np.full((i + 1, 3), i, dtype=np.float32), save_path)
        created.add(decode_shm_name_from_int64(name_code))
    shm = create_shm(128, save_path)
    created.add(shm.name)
    shm.close()
    assert len(created) == 6
    assert created <= _shm_names() - before
    release_shared_memory(save_path)
    assert not created & _shm_names()
    assert not os.path.exists(save_path)  # the save file is removed
    # Releasing again (file gone) is a no-op.
    release_shared_memory(save_path)


def test_release_skips_missing_names(save_path):
    name_code, _ = write_pixels_to_shm(np.ones(3), save_path)
    name = decode_shm_name_from_int64(name_code)
    with open(save_path, "a", encoding="utf-8") as f:
        f.write("psm_00000000\n\n")
    release_shared_memory(save_path)
    assert name not in _shm_names()


def test_get_data_after_release_raises(save_path):
    name_code, shape_code = write_pixels_to_shm(np.ones((2, 2)), save_path)
    release_shared_memory(save_path)
    with pytest.raises(RuntimeError, match="does not exist"):
        get_data_from_shm(name_code, shape_code)
