"""Shared multimodal runner: text + video requests through the continuous-batching engine."""
from atb_llm.runner.offline_runner import MultimodalInput, MultimodalPARunner  # noqa: F401 - re-exported
