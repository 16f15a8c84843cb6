"""Synthetic test videos, kept here for ``python -m examples.models.cogvlm2_llama3_video.synthetic_video``;
they live in ``atb_llm.demo.synthetic_video``."""
from atb_llm.demo.synthetic_video import (  # noqa: F401 - re-exported
    _main,
    read_frame_index,
    synthetic_frame,
    write_synthetic_video,
)

if __name__ == "__main__":
    _main()
