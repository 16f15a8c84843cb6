"""Weights: tensors by name from safetensors files, sharded for tensor parallelism
(MindIE's signatures, float weights only). Tensors are returned on CPU; the runner moves the model."""
import glob
import json
import os

import torch
from safetensors import safe_open
from tqdm import tqdm

_INTEGER_DTYPES = (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool)
# Loading progress (tensors read, shard being read) on stderr: "1" always, "0" never, "auto" (default) for
# checkpoints of 1 GiB or more, on rank 0.
PROGRESS_ENV = "COGVLM2_LOAD_PROGRESS"
_PROGRESS_MIN_BYTES = 1 << 30


class Weights:
    def __init__(self, model_name_or_path: str, device, dtype: torch.dtype, process_group,
                 quantize=None, is_gqa: bool = False, extension: str = ".safetensors", aliases=None,
                 mapping=None, **kwargs):
        self._check_float(quantize)
        self.model_name_or_path = model_name_or_path
        self.device = torch.device(device)
        self.dtype = dtype
        self.process_group = process_group
        self.quantize = quantize
        self.is_gqa = is_gqa
        self.mapping = mapping
        self.aliases = aliases or {}
        self.routing = self._build_routing(model_name_or_path, extension)
        self._handles: dict[str, object] = {}
        self._loaded: set[str] = set()
        self._progress: tqdm | None = None
        self._shard_numbers: dict[str, int] = {}
        self._show_progress = self._progress_wanted()

    def _progress_wanted(self) -> bool:
        mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
        if mode in ("0", "false", "no") or (self.process_group is not None and self.process_group.rank() != 0):
            return False
        if mode in ("1", "true", "yes"):
            return True
        files = set(self.routing.values())
        return sum(os.path.getsize(f) for f in files) >= _PROGRESS_MIN_BYTES

    def _count_loaded(self, name: str) -> None:
        """Advances the loading bar by one tensor; its postfix names the shard being read."""
        if not self._show_progress or name in self._loaded:
            return
        if self._progress is None:
            self._progress = tqdm(total=len(self.routing), unit="tensor", desc="loading weights")
            self._shard_numbers = {file: i + 1 for i, file in enumerate(sorted(set(self.routing.values())))}
        self._loaded.add(name)
        shard = self.routing.get(self.aliases.get(name, name))
        if shard is not None:
            self._progress.set_postfix_str(f"shard {self._shard_numbers[shard]}/{len(self._shard_numbers)}",
                                           refresh=False)
        self._progress.update(1)

    @staticmethod
    def _build_routing(path: str, extension: str) -> dict[str, str]:
        index_path = os.path.join(path, f"model{extension}.index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as file:
                weight_map = json.load(file).get("weight_map", {})
            routing = {name: os.path.join(path, filename) for name, filename in weight_map.items()}
            missing = sorted({file for file in routing.values() if not os.path.isfile(file)})
            if missing:
                raise FileNotFoundError(f"{index_path} names shard files that do not exist: {missing}")
            return routing
        files = sorted(f for f in glob.glob(os.path.join(path, f"*{extension}"))
                       if not os.path.basename(f).startswith("."))
        if not files:
            raise FileNotFoundError(f"no *{extension} weight files in {path}")
        routing = {}
        for filename in files:
            with safe_open(filename, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name in routing:
                        raise ValueError(f"tensor {name} is in both {routing[name]} and {filename}")
                    routing[name] = filename
        return routing

    def _file(self, name: str) -> tuple[str, str]:
        name = self.aliases.get(name, name)
        filename = self.routing.get(name)
        if filename is None:
            raise KeyError(f"tensor {name} is missing from the checkpoint {self.model_name_or_path}")
        return filename, name

    def _handle(self, name: str):
        """A shared handle of the tensor's file, for its header (shapes); tensors are read by ``_read``."""
        filename, name = self._file(name)
        if filename not in self._handles:
            self._handles[filename] = safe_open(filename, framework="pt")
        return self._handles[filename], name

    def _read(self, tensor_name: str) -> torch.Tensor:
        """The tensor, memory-mapped through a handle of its own. A tensor keeps the mapping it was read through
        alive, and every page read through a mapping stays in the process's RSS while the mapping lives: through
        one shared handle per file, the source pages of every weight quantized or repacked at load stayed resident
        as long as any tensor of that file was kept (GBs on the full-size model). With one mapping per tensor,
        a dropped source takes its pages with it. (An open costs ~0.1 ms: it parses the file's header.)"""
        filename, name = self._file(tensor_name)
        with safe_open(filename, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        self._count_loaded(tensor_name)
        return tensor

    def _correct_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype in _INTEGER_DTYPES:
            return tensor
        return tensor.to(self.dtype)

    def get_shape(self, tensor_name: str) -> list[int]:
        handle, name = self._handle(tensor_name)
        return list(handle.get_slice(name).get_shape())

    def get_tensor(self, tensor_name: str, ignore_tensor_correction: bool = False) -> torch.Tensor:
        tensor = self._read(tensor_name)
        return tensor if ignore_tensor_correction else self._correct_dtype(tensor)

    def get_partial_sharded(self, tensor_name: str, dim: int, gqa_size: int = 1) -> torch.Tensor:
        """This rank's contiguous block along ``dim``; whole gqa groups are replicated when there
        are fewer groups than ranks."""
        rank, world = self.process_group.rank(), self.process_group.size()
        name = tensor_name
        handle, real_name = self._handle(name)
        size = handle.get_slice(real_name).get_shape()[dim]
        groups = size // gqa_size
        if groups >= world:
            if size % world:
                raise ValueError(f"{name}: dimension {dim} of size {size} does not split over {world} ranks")
            block = size // world
            start = rank * block
        else:
            if world % groups:
                raise ValueError(f"{name}: {groups} groups cannot be replicated over {world} ranks")
            block = gqa_size
            start = (rank // (world // groups)) * gqa_size
        tensor = self._read(name).narrow(dim, start, block).contiguous()
        return self._correct_dtype(tensor)

    def get_sharded(self, tensor_name: str, dim: int, gqa_size: int = 1) -> torch.Tensor:
        return self.get_partial_sharded(tensor_name, dim, gqa_size)

    # The float path of MindIE's loaders; its quantized formats (w8a8, w8a16, gptq ...) are not mirrored.
    @staticmethod
    def _check_float(quantize) -> None:
        if quantize is not None:
            raise ValueError(f"quantize={quantize!r}: the portable host loads unquantized weights only")

    def get_multi_weights_col(self, prefixes: list[str], quantize, dim: int, gqa_size: int = 1,
                              routing_expert_dim=None) -> torch.Tensor:
        self._check_float(quantize)
        return torch.cat([self.get_sharded(f"{p}.weight", dim=dim, gqa_size=gqa_size) for p in prefixes], dim=dim)

    def get_multi_weights_row(self, prefix: str, quantize, gqa_size: int = 1, dim: int = 1) -> torch.Tensor:
        self._check_float(quantize)
        return self.get_sharded(f"{prefix}.weight", dim=dim, gqa_size=gqa_size)

    def get_replicated_weights(self, prefix: str, quantize) -> torch.Tensor:
        self._check_float(quantize)
        return self.get_tensor(f"{prefix}.weight")

    def release_file_handler(self) -> None:
        self._handles.clear()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
