"""Local-only loading helpers (MindIE's ``model_utils`` helpers)."""
import re

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from atb_llm.utils import file_utils

_URL = re.compile(r"https?://\S+")


def _strip_urls(error: Exception) -> str:
    return _URL.sub("<url>", str(error))


def safe_get_tokenizer_from_pretrained(model_path: str, **kwargs):
    """AutoTokenizer from a local directory only; URLs never appear in the error."""
    model_path = file_utils.standardize_path(model_path, check_link=False)
    file_utils.check_path_permission(model_path)
    kwargs["local_files_only"] = True
    # AutoTokenizer reads config.json and warns that our model_type is not a transformers model: it need not be.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(model_path, **kwargs)
    except Exception as error:
        raise OSError(f"cannot load the tokenizer from {model_path}: {_strip_urls(error)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def safe_from_pretrained(cls, model_path: str, **kwargs):
    kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(model_path, **kwargs)
    except Exception as error:
        raise OSError(f"cannot load {cls.__name__} from {model_path}: {_strip_urls(error)}") from None
