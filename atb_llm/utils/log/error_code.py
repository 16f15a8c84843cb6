"""Error codes that ``atb_llm`` passes to ``logger.error(msg, ErrorCode.X)``.

The member names follow the MindIE-LLM contract; the values are simply the names,
so a log line carries a stable, greppable tag.
"""

from enum import Enum


class ErrorCode(str, Enum):
    """Error categories attached to log records as an optional second argument."""

    ATB_MODELS_PARAM_OUT_OF_RANGE = "ATB_MODELS_PARAM_OUT_OF_RANGE"
    ATB_MODELS_MODEL_PARAM_JSON_INVALID = "ATB_MODELS_MODEL_PARAM_JSON_INVALID"
    ATB_MODELS_EXECUTION_FAILURE = "ATB_MODELS_EXECUTION_FAILURE"
    ATB_MODELS_PARAM_INVALID = "ATB_MODELS_PARAM_INVALID"
    ATB_MODELS_INTERNAL_ERROR = "ATB_MODELS_INTERNAL_ERROR"
    ATB_MODELS_OUT_OF_MEMORY = "ATB_MODELS_OUT_OF_MEMORY"

    def __str__(self) -> str:
        # str-mixin enums print as "ErrorCode.X" by default; the bare code reads better in logs.
        return self.value
