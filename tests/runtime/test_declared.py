"""The original's shape/dtype declaration: recorded for later pipelines, checked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dualpipe.runtime import declared as mod
from dualpipe.transport.wire import TensorMeta


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    before = mod.declared()
    yield
    mod._declared = before


def test_declaration_is_recorded_for_pipelines_built_later() -> None:
    mod.set_p2p_tensor_shapes([(3, 256, 512)])
    mod.set_p2p_tensor_dtype(torch.bfloat16)
    assert mod.declared() == mod.Declared(((3, 256, 512),), torch.bfloat16)
    with pytest.raises(TypeError, match="torch.dtype"):
        mod.set_p2p_tensor_dtype("float32")  # type: ignore[arg-type]


def test_mismatch_names_what_differs() -> None:
    fits = [TensorMeta((3, 4), torch.float32, True)]
    both = mod.Declared(((3, 4),), torch.float32)
    assert both.mismatch(fits) is None
    assert mod.Declared().mismatch(fits) is None
    shape = both.mismatch([TensorMeta((3, 5), torch.float32, True)])
    assert shape is not None and "[(3, 5)] but set_p2p_tensor_shapes declared [(3, 4)]" in shape
    dtype = both.mismatch([TensorMeta((3, 4), torch.float16, True)])
    assert dtype is not None and "declared torch.float32" in dtype
    count = both.mismatch(fits + fits)
    assert count is not None and "shapes [(3, 4), (3, 4)]" in count
