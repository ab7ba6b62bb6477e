"""The wire format of tensor metadata: a fixed-size int64 header per message boundary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import PipelineError

__all__ = ["HEADER_LEN", "TensorMeta", "encode_header", "decode_header"]

HEADER_LEN = 128
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPE_CODE[getattr(torch, _name)] = len(_DTYPES)
        _DTYPES.append(getattr(torch, _name))


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a receiver needs to allocate one tensor of a boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(t.shape), t.dtype, t.requires_grad)


def encode_header(metas: Sequence[TensorMeta], device: torch.device) -> torch.Tensor:
    """Pack metadata of a boundary's tensors into one int64 tensor of ``HEADER_LEN``."""
    words: list[int] = [len(metas)]
    for m in metas:
        if m.dtype not in _DTYPE_CODE:
            raise PipelineError(f"cannot send tensors of dtype {m.dtype} between stages")
        words += [_DTYPE_CODE[m.dtype], int(m.requires_grad), len(m.shape), *m.shape]
    if len(words) > HEADER_LEN:
        raise PipelineError(
            f"stage boundary carries too many tensors/dimensions to describe ({len(words)} words > "
            f"{HEADER_LEN})"
        )
    words += [0] * (HEADER_LEN - len(words))
    return torch.tensor(words, dtype=torch.int64, device=device)


def decode_header(header: torch.Tensor) -> list[TensorMeta]:
    """Inverse of :func:`encode_header`."""
    words = header.tolist()
    count, i, metas = words[0], 1, []
    for _ in range(count):
        code, rg, ndim = words[i], words[i + 1], words[i + 2]
        shape = tuple(words[i + 3 : i + 3 + ndim])
        metas.append(TensorMeta(shape, _DTYPES[code], bool(rg)))
        i += 3 + ndim
    return metas
