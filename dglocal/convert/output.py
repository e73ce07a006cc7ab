"""What every GGUF this folder writes shares (the model, its vision tower, a LoRA adapter, a synthetic file): the
types written directly, how rows are encoded in them, and the write beside the output that replaces it only once
complete."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType, quants

from dglocal.errors import ConvertError
from dglocal.files import os_error_text, replacing

# type name -> (GGML type of the weight matrices, general.file_type); also the choices llama.cpp's converter offers
# for mmproj files
DIRECT_TYPES = {
    "f32":  (Q.F32,  LlamaFileType.ALL_F32),
    "f16":  (Q.F16,  LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


def encode_rows(rows: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return rows.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return rows.astype(np.float16)
    return quants.quantize(rows, qtype)  # bf16 / q8_0, row-wise so chunking changes nothing


@contextmanager
def writing(output: Path) -> Iterator[Path]:
    """dglocal.files.replacing(output), with an OSError raised as the ConvertError that names the file and says
    what happened in words ("disk full")."""
    try:
        with replacing(output) as partial:
            yield partial
    except OSError as e:
        raise ConvertError(f"{output}: write failed: {os_error_text(e)} ({e})") from e
