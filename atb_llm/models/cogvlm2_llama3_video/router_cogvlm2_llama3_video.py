"""Router of cogvlm2-video-llama3-chat: how the framework finds this model's parts."""
from dataclasses import dataclass

import numpy as np
import torch

from atb_llm.models.base.router import BaseRouter
from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import (
    Cogvlm2_llama3_videoInputBuilder,
)


@dataclass
class Cogvlm2_llama3_videoRouter(BaseRouter):
    def get_input_builder(self):
        return Cogvlm2_llama3_videoInputBuilder(self.tokenizer, self.config)

    def tokenize(self, inputs: list[str | dict[str, str]], **kwargs) -> torch.Tensor:
        """Service path: items ``{"text": ...}`` / ``{"video": path}`` -> 1-D int64 ids with the video's
        shm codes in its vision slots. The items form one user turn of the model's template."""
        items = [{"text": item} if isinstance(item, str) else item for item in inputs]
        conversation = [{"role": "user", "content": items}]
        ids = self.input_builder.make_context(0, conversation, **kwargs)
        return torch.from_numpy(np.asarray(ids, dtype=np.int64))


# Older MindIE releases derive the class name without underscores.
Cogvlm2llama3videoRouter = Cogvlm2_llama3_videoRouter
