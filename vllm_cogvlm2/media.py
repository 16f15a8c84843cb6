"""The video loader vLLM's media connector uses for this model: it keeps the file's bytes undecoded.

vLLM's own loaders pick frames by a count or an fps; CogVLM2-Video picks them by its template's rule
(docs/MODEL.md section 3: one frame per second up to 24 for chat, 24 over the first minute for base), which
the multimodal processor applies when it knows the checkpoint's template. So the connector's step (an
``http(s)``, ``data:`` or ``file://`` URL read into bytes) stays vLLM's, and decoding (only the chosen frames)
happens once, in the processor. The loader is selected for the model through vLLM's video-processor-name
lookup (see ``vllm_cogvlm2.register``); with any other loader the processor decodes the original bytes
again with the model's rule, so the frames are right either way.
"""
from dataclasses import dataclass, field
from typing import Any

LOADER_NAME = "cogvlm2_video"
VIDEO_PROCESSOR_NAME = "CogVLM2VideoFrameRule"


@dataclass(frozen=True)
class EncodedVideo:
    """An encoded video file's bytes, decoded later with the model's frame rule."""

    data: bytes = field(repr=False)

    def __len__(self) -> int:  # vLLM may ask a video item for its length; it has no frames yet
        return 0


def make_loader_class():
    from vllm.multimodal.video import VideoLoader

    class CogVLM2VideoLoader(VideoLoader):
        @classmethod
        def load_bytes(cls, data: bytes, **kwargs: Any) -> tuple[EncodedVideo, dict[str, Any]]:
            return EncodedVideo(bytes(data)), {"video_backend": LOADER_NAME}

    return CogVLM2VideoLoader
