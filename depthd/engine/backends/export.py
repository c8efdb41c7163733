"""The network exported to ONNX, once per processed size, and kept on disk.

An export is keyed by everything that makes it: the checkpoint's files (their content
hash), the attention implementation, the exporter and opset, and the versions of torch,
transformers and depthd. The processed size names the file. A second start finds its
files and loads no torch weights at all; a new size loads them, exports, and drops them.

The TorchScript-based exporter (`dynamo=False`) is used: for Depth Anything V2 Small the
dynamo exporter's graph ran 1.28x slower under ONNX Runtime on a CPU, with the same map
(benchmarks/exporters.py, docs/performance.md). Every size is fixed, the batch at one frame:
Depth Anything's position embedding is interpolated to the traced size, and ZoeDepth's traced
graph splits by the traced batch. On a CPU a batch is no faster per frame than single frames (docs/performance.md).
The torch weights an export loads are dropped after it, and the freed heap handed back.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

OPSET = 17
EXPORTER = "torchscript"
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt")


class ExportFailed(Exception):
    """The network could not be exported to ONNX (an operation the exporter does not know, say)."""


def checkpoint_digest(files: list[Path]) -> str:
    """A content hash of a checkpoint's files. Files in the Hugging Face cache are named by their
    own content hash (blobs/<sha256>), which is used as it is; other files are read and hashed."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        if not path.name.endswith(WEIGHT_SUFFIXES):
            continue
        real = path.resolve()
        digest.update(path.name.encode() + b"\0")
        if real.parent.name == "blobs":
            digest.update(real.name.encode())
        else:
            with open(real, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def export_key(files: list[Path], attention: str | None) -> dict[str, str]:
    """What an export depends on; its hash names the export's folder."""
    import transformers

    from depthd import __version__

    return {
        "checkpoint": checkpoint_digest(files),
        "attention": attention or "default",
        "exporter": EXPORTER,
        "opset": str(OPSET),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "depthd": __version__,
    }


def release_freed_memory() -> None:
    """Hand memory freed by an export (the torch weights it loaded, the traced graph) or by a
    compile (the graph read from the file) back to the system.

    glibc keeps freed blocks in its arenas, and a process does not shrink until `malloc_trim(0)`
    returns their free pages. Measured (docs/performance.md): a cold start's RSS after warm-up
    went from 830 to 757 MiB against 589 MiB warm; the rest is live, chiefly the modules that
    loading the torch weights imports. Where the C library has no malloc_trim (musl, macOS),
    only the collection runs."""
    gc.collect()  # the exporter's traced graph can hold the model in reference cycles
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the process's C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the symbols already in the process: its own libc
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class _Network(torch.nn.Module):
    """The depth model as ONNX sees it: pixel values in, a tuple of tensors out."""

    def __init__(self, model: Any, field_of_view: bool):
        super().__init__()
        self.model = model
        self.field_of_view = field_of_view

    def forward(self, pixel_values: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values)
        if self.field_of_view:
            return outputs.predicted_depth, outputs.field_of_view
        return (outputs.predicted_depth,)


class OnnxExports:
    """The ONNX files of one checkpoint, one per processed size, exported when first asked for.

    `load_model` gives a float32 copy of the model on the CPU; it is called only when a size's
    file is missing, and the copy is dropped after the export. `exported` and `found` count
    what this process did, for tests and logs."""

    def __init__(self, name: str, root: Path, key: dict[str, str], load_model: Callable[[], Any], field_of_view: bool):
        self.name = name
        self.key = key
        self.folder = root / "onnx" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.field_of_view = field_of_view
        self._load_model = load_model
        self._lock = threading.Lock()
        self.exported = 0
        self.found = 0

    @property
    def outputs(self) -> list[str]:
        return ["predicted_depth", "field_of_view"] if self.field_of_view else ["predicted_depth"]

    def path_for(self, size: tuple[int, int]) -> Path:
        """The ONNX file of the network at (height, width), exported now if it is not on disk."""
        path = self.folder / f"{size[0]}x{size[1]}.onnx"
        with self._lock:
            if path.is_file():
                self.found += 1
                logger.info("export found model=%s size=%dx%d path=%s", self.name, size[1], size[0], path)
                return path
            started = time.perf_counter()
            try:
                self._export(path, size)
            finally:
                release_freed_memory()
            self.exported += 1
            logger.info("exported model=%s size=%dx%d path=%s ms=%.0f",
                        self.name, size[1], size[0], path, (time.perf_counter() - started) * 1000)
            return path

    def _export(self, path: Path, size: tuple[int, int]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExportFailed(f"cannot create the export cache {self.folder} ({error.strerror}): set cache_dir") from error
        (self.folder / "key.json").write_text(json.dumps(self.key, indent=2) + "\n")
        network = _Network(self._load_model(), self.field_of_view).eval()
        height, width = size
        example = torch.linspace(-1, 1, 3 * height * width).reshape(1, 3, height, width)
        handle, scratch = tempfile.mkstemp(suffix=".onnx", dir=self.folder)
        os.close(handle)
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    network, (example,), scratch, dynamo=False, opset_version=OPSET,
                    input_names=["pixel_values"], output_names=self.outputs,
                )
            os.replace(scratch, path)
        except ExportFailed:
            raise
        except Exception as error:  # the exporter raises many types; each means "this network does not export"
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportFailed(f"torch.onnx.export failed: {first[:300]}") from error
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
