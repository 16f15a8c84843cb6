"""InputBuilder: turns a conversation into token ids (MindIE's signature, tests/data/mindie_api_surface.json)."""
from collections.abc import Iterable

import numpy as np


class InputBuilder:
    def __init__(self, tokenizer, chat_template: str = "", system_role_name: str = "system",
                 user_role_name: str = "user", max_length: int = 2048):
        self.tokenizer = tokenizer
        self.system_role_name = system_role_name
        self.user_role_name = user_role_name
        self.max_length = max_length
        if chat_template:
            tokenizer.chat_template = chat_template

    def make_context(self, rank: int, conversation: list[dict], add_generation_prompt: bool = True,
                     adapt_to_max_length: bool = False, **kwargs) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template")
        return self._apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def _apply_chat_template(self, conversation: list[dict], **kwargs) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=kwargs.get("add_generation_prompt", True), tokenize=True))

    @staticmethod
    def generate_position_ids(input_ids: np.ndarray) -> Iterable:
        return range(len(input_ids))
