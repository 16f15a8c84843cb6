"""Shared fixtures: tiny random checkpoints in the real HF layout and real video files."""
import os
import tempfile

import pytest

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.demo.synthetic_video import write_synthetic_video


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """Temp files of the tests and of the processes they start (torchrun keeps a log folder per run) go
    under pytest's own temporary tree, which it prunes, instead of piling up in /tmp."""
    path = str(tmp_path_factory.mktemp("tmp"))
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = path, path
    yield path
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> str:
    return make_demo_checkpoint(str(tmp_path_factory.mktemp("chat_model")), seed=1)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> str:
    return make_demo_checkpoint(str(tmp_path_factory.mktemp("base_model")), seed=2, template="base", shards=1)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def video_6_frames(video_dir) -> str:
    """5 s at 10 fps: the chat rule picks 6 frames."""
    return write_synthetic_video(os.path.join(video_dir, "six.mp4"), seconds=5, fps=10, size=(96, 64), seed=3)


@pytest.fixture(scope="session")
def video_24_frames(video_dir) -> str:
    """26 s at 4 fps: the chat rule picks 24 frames."""
    return write_synthetic_video(os.path.join(video_dir, "long.mp4"), seconds=26, fps=4, size=(96, 64), seed=4)


@pytest.fixture(scope="session")
def video_3_frames(video_dir) -> str:
    return write_synthetic_video(os.path.join(video_dir, "three.mp4"), seconds=2.5, fps=8, size=(64, 96), seed=5)


@pytest.fixture(scope="session")
def inproc_media(tmp_path_factory, video_6_frames) -> str:
    """An allowed media directory for the in-process service: ``clip.mp4`` (6 frames) and a corrupt file."""
    import shutil

    media = tmp_path_factory.mktemp("inproc_media")
    shutil.copy(video_6_frames, media / "clip.mp4")
    (media / "corrupt.mp4").write_bytes(os.urandom(4096))
    return str(media)


@pytest.fixture(scope="session")
def inproc(chat_model_dir, inproc_media):
    """One in-process service (tests/inprocess.py) shared by the protocol tests."""
    from service.core import ServiceConfig
    from tests.inprocess import InProcess

    app = InProcess(ServiceConfig(model_path=chat_model_dir, allowed_media_dirs=[inproc_media], max_seq_len=640,
                                  max_batch_size=16))
    yield app
    app.close()
