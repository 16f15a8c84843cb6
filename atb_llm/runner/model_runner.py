"""ModelRunner: loads a model through ``get_model`` and drives its forward (MindIE's signature)."""

import torch

from atb_llm.models import get_model
from atb_llm.runner.cache import copy_kv_blocks
from atb_llm.utils.dist import initialize_distributed
from atb_llm.utils.log import logger
from atb_llm.utils.weights import Weights

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        dtype = default or torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        # fp16 matmuls take a scalar path on CPUs (two orders of magnitude slower); bf16 has the same size.
        logger.warning("float16 on CPU is very slow; computing in bfloat16 instead")
        dtype = torch.bfloat16
    return dtype


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class ModelRunner:
    def __init__(self, model_name_or_path: str, rank: int, world_size: int, npu_id: int | None = None,
                 local_rank: int | None = None, is_flash_causal_lm: bool = True, load_tokenizer: bool = True,
                 max_position_embeddings: int | None = None, tokenizer_path: str | None = None,
                 enable_edge: bool = False, llm_config_path=None, models_dict=None, **kwargs):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank
        device = kwargs.get("device")
        self.device = torch.device(device) if device is not None else default_device(self.local_rank)
        self.process_group = initialize_distributed(rank, world_size, self.device)
        self.router = get_model(model_name_or_path, is_flash_causal_lm=is_flash_causal_lm,
                                load_tokenizer=load_tokenizer, max_position_embeddings=max_position_embeddings,
                                tokenizer_path=tokenizer_path,
                                sub_model_path=f"part{self.local_rank}-of-{world_size}")
        self.model_name_or_path = self.router.model_name_or_path
        self.model_cls = self.router.model_cls
        self.config = self.router.config
        self.tokenizer = self.router.tokenizer
        self.input_builder = self.router.input_builder if load_tokenizer else None
        self.config_dict = self.router.config_dict
        self.max_position_embeddings = max_position_embeddings or self.config.max_position_embeddings or 2048
        self.dtype = resolve_dtype(kwargs.get("dtype"), getattr(self.config, "torch_dtype", None), self.device)
        self.kv_cache_dtype = self.dtype
        self.kv_quant_type = None  # MindIE reads it from quantization_config; the portable cache is unquantized
        self.model = None
        # Leader/follower tensor parallelism: rank 0 schedules and broadcasts each step's inputs, the other
        # ranks only run the model (``follow``). Off: every rank runs the same engine in lockstep.
        self.leads_followers = False

    def load_weights(self, **kwargs) -> None:
        """``linear_quantize="w8a16"``: the portable host quantizes the LM linears of a float checkpoint as it
        loads them (a keyword MindIE's runner never passes; its ``quantize`` config path is unchanged)."""
        weights = Weights(self.model_name_or_path, self.device, self.dtype, process_group=self.process_group)
        extra = {"linear_quantize": kwargs["linear_quantize"]} if kwargs.get("linear_quantize") else {}
        try:
            self.model = self.model_cls(self.config, weights, max_batch_size=kwargs.get("max_batch_size"), **extra)
        except TypeError:
            if extra:
                raise
            self.model = self.model_cls(self.config, weights)
        self.model.to(self.device)
        self.model.eval()
        weights.release_file_handler()
        self.soc_info = self.model.soc_info
        self.head_size = self.model.head_size
        self.num_heads = self.model.num_attention_heads
        self.num_kv_heads = self.model.num_key_value_heads
        self.num_layers = self.model.num_layers
        self.k_head_size = self.v_head_size = self.head_size

    def forward(self, **kwargs) -> torch.Tensor:
        if self.leads_followers:
            self._broadcast_step({k: v for k, v in kwargs.items() if k != "kv_cache"})
        try:
            return self.model.forward(**kwargs)
        except torch.OutOfMemoryError as error:
            raise RuntimeError(f"out of device memory during forward: {error}") from error

    def copy_kv_blocks(self, kv_cache, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.leads_followers:
            self._broadcast_step({"copy_kv_blocks": (src, dst)})
        copy_kv_blocks(kv_cache, src, dst)

    def _broadcast_step(self, step: dict | None) -> None:
        payload = [None if step is None else _to_cpu(step)]
        torch.distributed.broadcast_object_list(payload, src=0, group=self.process_group)

    def follow(self, kv_cache) -> None:
        """Ranks other than 0: run every step rank 0 broadcasts, until it says stop."""
        while True:
            payload = [None]
            torch.distributed.broadcast_object_list(payload, src=0, group=self.process_group)
            step = payload[0]
            if step is None:
                return
            try:
                step = _to_device(step, self.device)
                if "copy_kv_blocks" in step:
                    copy_kv_blocks(kv_cache, *step["copy_kv_blocks"])
                    continue
                self.model.forward(kv_cache=kv_cache, **step)
            except Exception as error:  # rank 0 sees the same failure and reports it
                logger.warning(f"rank {self.rank}: step failed: {error}")

    def release_followers(self) -> None:
        """Rank 0: let the following ranks return from ``follow``."""
        if self.leads_followers:
            self._broadcast_step(None)
            self.leads_followers = False

    def generate_position_ids(self, input_ids):
        return self.input_builder.generate_position_ids(input_ids)

    def build_inputs(self, conversations, **kwargs):
        return [self.input_builder.make_context(self.rank, conversation, **kwargs) for conversation in conversations]
