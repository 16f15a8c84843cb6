"""FlashForCausalLM: the model base class the runners drive (the forward contract: docs/DESIGN.md).

The portable host keeps the attributes the runners read and none of the ATB graph machinery:
plugin models implement ``forward`` themselves in PyTorch.
"""
import math

import torch
from torch import nn


class FlashForCausalLM(nn.Module):
    def __init__(self, config, weights, **kwargs):
        super().__init__()
        self.model = None
        self.lm_head = None
        self.config = config
        self.soc_info = None
        self.device = weights.device
        self.dtype = weights.dtype
        self.process_group = weights.process_group
        self.tp_rank = weights.process_group.rank()
        self.tp_world_size = weights.process_group.size()

        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.hidden_size = config.hidden_size
        self.head_size = self.hidden_size // total_heads
        self.num_layers = config.num_hidden_layers
        # Heads are per rank; KV heads are replicated when there are fewer of them than ranks.
        self.num_attention_heads = math.ceil(total_heads / self.tp_world_size)
        if total_kv_heads < self.tp_world_size:
            total_kv_heads *= self.tp_world_size // total_kv_heads
        self.num_key_value_heads = math.ceil(total_kv_heads / self.tp_world_size)
        self.rope_theta = getattr(config, "rope_theta", None) or 10000.0
        self.max_position_embeddings = config.max_position_embeddings
        self.quantize = getattr(config, "quantize", None)
        self.placeholder = torch.zeros(1, device=self.device)
        self.warmup_is_end = True
        self.kvcache_quant_layers = []
        self.is_multimodal = False

    def forward(self, input_ids, position_ids, is_prefill, kv_cache, block_tables, slots, input_lengths,
                max_seq_len, lm_head_indices=None, reset=False, **kwargs):
        raise NotImplementedError
