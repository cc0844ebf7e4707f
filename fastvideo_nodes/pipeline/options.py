"""LoadOptions: how the models are loaded, validated once, built alike by the API, CLI and node.

The same half-dozen settings used to be repeated as keywords in four signatures (API, CLI, node,
worker pool), and fp8 was two booleans with three vocabularies. Here there is one frozen object
and one vocabulary for weight storage:

    as_stored  the file's dtypes (fp8 files stay fp8)
    fp8        linear weights stored as e4m3fn with one scale per output channel, dequantised at use
    fp8_fast   as fp8, and the DiT's block linears multiply on fp8 tensor cores (compute capability 8.9+)

It sits next to `SamplingSettings`, which does the same for one video's sampling settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import FastVideoError

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PRECISION_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
WEIGHT_STORAGE = ("as_stored", "fp8", "fp8_fast")
# Words of earlier releases (saved ComfyUI workflows hold them): still accepted.
WEIGHT_STORAGE_ALIASES = {"as stored": "as_stored", "fp8_e4m3fn": "fp8", "fp8_e4m3fn_fast": "fp8_fast"}


def parse_device(device, name: str = "device") -> torch.device:
    """None → cuda when visible, else cpu; otherwise cpu, cuda or cuda:N (a GPU that is here)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise FastVideoError(f"{name} {device!r} is not a device this runs on; use cpu, cuda or cuda:N "
                             f"(N a GPU index).")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FastVideoError(f"{name} {device!r} was asked for but no CUDA GPU is visible; use cpu.")
        if parsed.index is not None and parsed.index >= count:
            raise FastVideoError(f"{name} {device!r}: only {count} GPU(s) visible; use cuda:0..cuda:{count - 1}.")
    return parsed


def _precision_name(precision) -> str | None:
    if precision is None:
        return None
    if isinstance(precision, torch.dtype):
        for name, dtype in PRECISIONS.items():
            if dtype == precision:
                return name
    else:
        name = str(precision).lower()
        name = _PRECISION_ALIASES.get(name, name)
        if name in PRECISIONS:
            return name
    raise FastVideoError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)} "
                         "(or leave it unset: bf16 on GPU, fp32 on CPU).")


@dataclass(frozen=True)
class LoadOptions:
    """How the DiT, text encoder and VAE are loaded. Validated (and normalised) on construction.

    device: where the models run; None = cuda when visible, else cpu.
    precision: compute dtype, bf16 | fp16 | fp32; None = bf16 on GPU, fp32 on CPU.
    weight_storage: as_stored | fp8 | fp8_fast (see the module docstring).
    compile: torch.compile the DiT blocks (the first run of a shape pays the warm-up).
    gpu_memory_gb: GPU memory the DiT may use; blocks beyond it stream from CPU memory.
        None (or 0) = all resident when it fits the free memory, else fit it automatically.
    text_encoder_device: where prompts are encoded ("cpu" for cards too small for UMT5-XXL);
        None = the main device, with the encoder moved back to CPU after each encoding.
    """
    device: str | None = None
    precision: str | None = None
    weight_storage: str = "as_stored"
    compile: bool = False
    gpu_memory_gb: float | None = None
    text_encoder_device: str | None = None

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        if self.device is not None:
            put("device", str(parse_device(self.device)))
        put("precision", _precision_name(self.precision))
        storage = WEIGHT_STORAGE_ALIASES.get(self.weight_storage, self.weight_storage)
        if storage not in WEIGHT_STORAGE:
            raise FastVideoError(f"weight_storage {self.weight_storage!r} is unknown; use one of "
                                 f"{', '.join(WEIGHT_STORAGE)} (fp8: half the memory; fp8_fast: also fp8 matmuls).")
        put("weight_storage", storage)
        if not isinstance(self.compile, bool):
            raise FastVideoError(f"compile must be True or False, got {self.compile!r}.")
        gb = self.gpu_memory_gb
        if gb is not None:
            if isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb < 0:
                raise FastVideoError(f"gpu_memory_gb must be a number of GB ≥ 0 (0 or None: fit automatically), "
                                     f"got {gb!r}.")
            put("gpu_memory_gb", float(gb) or None)
        if self.text_encoder_device is not None:
            put("text_encoder_device", str(parse_device(self.text_encoder_device, "text_encoder_device")))

    @classmethod
    def from_keywords(cls, options: LoadOptions | None = None, *, dtype=None, weight_dtype=None,
                      fp8_matmul: bool = False, **fields) -> LoadOptions:
        """`options` with the given fields replaced. Also takes the older keywords: dtype (= precision),
        weight_dtype=torch.float8_e4m3fn (= fp8) and fp8_matmul=True (= fp8_fast)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise FastVideoError(f"unknown load option(s) {', '.join(sorted(unknown))}; valid: "
                                 f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        if dtype is not None:
            fields.setdefault("precision", dtype)
        if weight_dtype is not None and weight_dtype != torch.float8_e4m3fn:
            raise FastVideoError(f"weight_dtype {weight_dtype} is not supported; use weight_storage='fp8' "
                                 "(float8_e4m3fn) or leave it unset.")
        if fp8_matmul:
            fields.setdefault("weight_storage", "fp8_fast")
        elif weight_dtype is not None:
            fields.setdefault("weight_storage", "fp8")
        return dataclasses.replace(options, **fields) if options is not None else cls(**fields)

    def replace(self, **fields) -> LoadOptions:
        return dataclasses.replace(self, **fields)

    # -- what the loaders take

    @property
    def torch_device(self) -> torch.device:
        return parse_device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        if self.precision is None:
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return PRECISIONS[self.precision]

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """Storage dtype for linear weights; None = as stored."""
        return None if self.weight_storage == "as_stored" else torch.float8_e4m3fn

    @property
    def fp8_matmul(self) -> bool:
        return self.weight_storage == "fp8_fast"
