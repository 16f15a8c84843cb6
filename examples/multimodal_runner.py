"""Shared multimodal runner: text + video requests through the continuous-batching engine."""
import os
from collections.abc import Sequence
from dataclasses import dataclass

from atb_llm.runner.engine import Request
from atb_llm.runner.sampler import SamplingParams
from examples.run_pa import PARunner


@dataclass
class MultimodalInput:
    text: str
    video: str | None = None


def video_key(path: str, template: str) -> str:
    """Identity of a decoded video for the vision-feature cache: the file's identity and the frame rule."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{template}"


class MultimodalPARunner(PARunner):
    def prepare_conversation(self, conversation: list[dict], sampling: SamplingParams) -> Request:
        """Decode the video and lay out the prompt; a bad input becomes a request that has already failed."""
        try:
            builder = self.model.input_builder
            ids, pixels, video = builder.prepare(conversation)
            key = video_key(video, builder.template) if video else None
            return Request(prompt_ids=ids, sampling=sampling, pixel_values=pixels, video_key=key)
        except (ValueError, OSError) as error:
            return Request(prompt_ids=[], sampling=sampling, finish_reason="error", error=str(error))

    def prepare_request(self, item: MultimodalInput, sampling: SamplingParams) -> Request:
        content = [{"text": item.text}] if item.video is None else [{"video": item.video}, {"text": item.text}]
        return self.prepare_conversation([{"role": "user", "content": content}], sampling)

    def infer_multimodal(self, items: Sequence[MultimodalInput], sampling: SamplingParams) -> list[Request]:
        return self.run_prepared([self.prepare_request(item, sampling) for item in items])

    def run_prepared(self, requests: list[Request]) -> list[Request]:
        """Run the requests that were prepared without error; return all of them, in order."""
        self.run([r for r in requests if r.error is None])
        return requests
