"""The depth engine: uint8 frames in, depth maps out, all the tensor work on the model's device.

One `DepthEngine` wraps one loaded model and its recipe. `prepare` turns frames into the
model's input, `infer` runs the forward pass (one per processed size) and the recipe's
post-processing and encodes each map as asked, and returns one `DepthResult` per frame, in
order. The engine owns no threads: the pool decides what goes into a batch and when.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from depthd.config import ModelSettings
from depthd.domain import DepthEncoding, DepthKind, DepthResult, Frame, OutputSpec, PixelFormat, StageTimes
from depthd.engine import colormaps
from depthd.engine.checkpoints import Checkpoint, load_checkpoint
from depthd.engine.encode import EncodedMap, encode
from depthd.engine.geometry import focal_length_px
from depthd.engine.pixels import to_rgb
from depthd.engine.plan import Plan
from depthd.errors import InvalidArgument, ModelLoadError

logger = logging.getLogger(__name__)

# Frames wrap the request's bytes read-only and are never written: torch's warning about it is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def set_torch_threads(count: int) -> None:
    """Threads for torch's CPU kernels, for the whole process."""
    torch.set_num_threads(count)


def cpu_threads() -> int:
    return torch.get_num_threads()


def resolve_device(spec: str | None) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise InvalidArgument(f"device: {spec!r} is not a device (auto, cpu, cuda or cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device: {spec!r} asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    if spec in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


@dataclass
class _Group:
    """Frames of one processed size after their shared forward pass; `indices` index the batch."""

    indices: list[int]
    predicted: torch.Tensor
    field_of_view: torch.Tensor | None


@dataclass
class Prepared:
    """One frame pre-processed for the model: its input tensor on the device, and how it was made.

    Frames with the same `processed` size can share a forward pass.
    """

    pixel_values: torch.Tensor
    """1 x C x H x W, on the model's device, in the model's dtype."""
    plan: Plan
    preprocess_ms: float

    @property
    def processed(self) -> tuple[int, int]:
        return self.plan.processed

    @property
    def input_size(self) -> tuple[int, int]:
        return self.plan.input_size


class DepthEngine:
    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, settings: ModelSettings):
        self.checkpoint = checkpoint
        self.recipe = checkpoint.recipe
        self.device = device
        self.dtype = dtype
        self.settings = settings
        architecture = checkpoint.architecture
        self.flip = architecture.flip_by_default if settings.flip_augmentation is None else settings.flip_augmentation
        self.kind: DepthKind = architecture.kind(checkpoint.config)
        self._luts: dict[str, torch.Tensor | None] = {}
        self._model = self._compiled(checkpoint.model)

    @classmethod
    def load(cls, settings: ModelSettings) -> "DepthEngine":
        """Load the model `settings` describes; its device and dtype None (or "auto") mean the best there is."""
        try:
            device = resolve_device(settings.device)
            dtype = resolve_dtype(settings.dtype, device)
            if settings.cuda_graphs and device.type != "cuda":
                raise InvalidArgument(f"cuda_graphs: needs a CUDA device, the model is on {device}")
        except InvalidArgument as error:
            raise ModelLoadError(settings.name, settings.source, str(error)) from error
        checkpoint = load_checkpoint(settings, device, dtype)
        if settings.channels_last:
            checkpoint.model.to(memory_format=torch.channels_last)
        return cls(checkpoint, device, dtype, settings)

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def compiled(self) -> bool:
        return self.settings.compile or self.settings.cuda_graphs

    @property
    def prepares_concurrently(self) -> bool:
        """Whether pre-processing should overlap the forward pass. On CPU it would share the
        cores with it: measured, a forward pass ran 6% slower with the next frames pre-processed
        beside it, more than the 15 ms the pre-processing itself takes (docs/performance.md)."""
        return self.device.type != "cpu"

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model sees a frame of this size at."""
        return self.recipe.plan(height, width).processed

    @property
    def max_processed_side(self) -> int:
        return self.recipe.cap.longest

    def input_bytes(self, height: int, width: int) -> int:
        """What one frame's input tensor takes on the device."""
        processed = self.processed_size(height, width)
        return 3 * processed[0] * processed[1] * self.dtype.itemsize

    @property
    def default_max_batch(self) -> int:
        """On CPU a batch of two costs more than two single frames (docs/performance.md); on CUDA it is nearly free."""
        return 8 if self.device.type == "cuda" else 1

    def check_output(self, spec: OutputSpec) -> None:
        """Refuse what this model cannot give, before any work is done."""
        if spec.encoding is DepthEncoding.UINT16_MM and self.kind is not DepthKind.METRIC:
            raise InvalidArgument(
                f"output.encoding: UINT16_MM needs a metric model; {self.name!r} gives "
                f"{self.kind.value.replace('_', ' ')}, ask for FLOAT32 or FLOAT16"
            )
        if spec.colormap is not None and spec.colormap not in colormaps.NAMES:
            raise InvalidArgument(f"output.colormap: {spec.colormap!r} is not one of {', '.join(colormaps.NAMES)}")
        if spec.width < 0 or spec.height < 0:
            raise InvalidArgument("output.width/height: must be 0 (the input's size) or positive")

    def estimate(self, frames: list[Frame], specs: list[OutputSpec]) -> list[DepthResult]:
        """Depth for every frame, in order; frames of one processed size share a forward pass."""
        return self.infer(self.prepare(frames), specs)

    def prepare(self, frames: list[Frame]) -> list[Prepared]:
        """Pre-process frames on the device, frames of one input size and format as one tensor.

        On CUDA the pool calls this on its decode threads, one frame at a time, so that
        it overlaps the forward pass of the batch before.
        """
        by_input: dict[tuple, list[int]] = defaultdict(list)
        for index, frame in enumerate(frames):
            by_input[(frame.height, frame.width, frame.pixel_format)].append(index)
        prepared: list[Prepared | None] = [None] * len(frames)
        with torch.inference_mode():
            for (height, width, pixel_format), indices in by_input.items():
                with self._stage() as took:
                    pixels = torch.stack([torch.from_numpy(frames[i].pixels) for i in indices])
                    if self.device.type == "cuda":
                        pixels = pixels.pin_memory()
                    pixels = pixels.to(self.device, non_blocking=True)
                    plan = self.recipe.plan(height, width)
                    values = self.recipe.preprocess(to_rgb(pixels, PixelFormat(pixel_format)), plan, self.dtype)
                    if self.settings.channels_last:
                        values = values.contiguous(memory_format=torch.channels_last)
                for row, index in enumerate(indices):
                    prepared[index] = Prepared(values[row : row + 1], plan, took[0] / len(indices))
        return prepared

    def infer(self, prepared: list[Prepared], specs: list[OutputSpec]) -> list[DepthResult]:
        """Forward and post-process pre-processed frames, one forward pass per processed size."""
        if len(prepared) != len(specs):
            raise ValueError("one OutputSpec per frame")
        for spec in specs:
            self.check_output(spec)
        with torch.inference_mode():
            with self._stage() as inference:
                groups = self._forward(prepared)
            with self._stage() as postprocess:
                encoded = self._postprocess(groups, prepared, specs)
                results = self._to_host(encoded, specs)
        for item, result in zip(prepared, results):
            result.timing = StageTimes(item.preprocess_ms, inference[0], postprocess[0], len(prepared))
        return results

    def warmup(self, sizes: tuple[tuple[int, int], ...], batch: int = 1) -> None:
        """Run a forward pass at each (height, width), so that no request pays for the first one."""
        for height, width in sizes:
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
            frame = Frame(np.ascontiguousarray(pixels, dtype=np.uint8))
            started = time.perf_counter()
            self.estimate([frame] * batch, [OutputSpec()] * batch)
            logger.info(
                "warmed model=%s size=%dx%d batch=%d ms=%.1f",
                self.name, width, height, batch, (time.perf_counter() - started) * 1000,
            )

    # --- stages ------------------------------------------------------------------------------

    def _forward(self, prepared: list[Prepared]) -> list[_Group]:
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, item in enumerate(prepared):
            by_size[item.processed].append(index)
        groups = []
        for indices in by_size.values():
            batch = torch.cat([prepared[i].pixel_values for i in indices])
            if self.flip:
                batch = torch.cat([batch, batch.flip(-1)])
            outputs = self._model(pixel_values=batch)
            predicted = outputs.predicted_depth
            fov = getattr(outputs, "field_of_view", None)
            if self.flip:
                predicted = _average_flipped(predicted)
                fov = None if fov is None else fov.view(2, -1).mean(0)
            groups.append(_Group(indices, predicted, None if fov is None else fov.flatten()))
        return groups

    def _postprocess(self, groups: list[_Group], prepared: list[Prepared], specs: list[OutputSpec]) -> dict[int, tuple]:
        out: dict[int, tuple] = {}
        for group in groups:
            predicted = group.predicted.float()
            by_output: dict[tuple[Plan, tuple[int, int]], list[int]] = defaultdict(list)
            for position, index in enumerate(group.indices):
                item = prepared[index]
                by_output[(item.plan, specs[index].size_for(*item.input_size))].append(position)
            for (plan, out_size), positions in by_output.items():
                fov = None if group.field_of_view is None else group.field_of_view[positions]
                depth = self.recipe.postprocess(predicted[positions], fov, plan, out_size)
                for row, position in enumerate(positions):
                    index = group.indices[position]
                    spec = specs[index]
                    encoded = encode(depth[row], self.kind, spec.encoding, spec.visualization, self._lut(spec.colormap))
                    out[index] = (encoded, None if fov is None else float(fov[row]))
        return out

    def _to_host(self, encoded: dict[int, tuple], specs: list[OutputSpec]) -> list[DepthResult]:
        results = []
        for index in range(len(specs)):
            item, fov = encoded[index]
            item: EncodedMap
            lo, hi = item.stats.cpu().tolist()
            depth = item.depth.cpu().numpy()
            vis = None if item.visualization is None else item.visualization.cpu().numpy()
            results.append(
                DepthResult(
                    depth=depth,
                    encoding=specs[index].encoding,
                    kind=self.kind,
                    min=lo,
                    max=hi,
                    visualization=vis,
                    field_of_view=fov,
                    focal_length=None if fov is None else focal_length_px(fov, depth.shape[1]),
                )
            )
        return results

    # --- helpers ---------------------------------------------------------------------------------

    def _compiled(self, model):
        if self.settings.cuda_graphs:
            return torch.compile(model, mode="reduce-overhead")
        if self.settings.compile:
            return torch.compile(model)
        return model

    def _lut(self, name: str | None) -> torch.Tensor | None:
        name = name or "gray"
        if name not in self._luts:
            table = colormaps.lookup_table(name)
            self._luts[name] = None if table is None else torch.from_numpy(table).to(self.device)
        return self._luts[name]

    @contextmanager
    def _stage(self):
        """Time a stage in milliseconds; on CUDA, wait for the device so the time is the stage's own."""
        box = [0.0]
        started = time.perf_counter()
        yield box
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        box[0] = (time.perf_counter() - started) * 1000


def _average_flipped(predicted: torch.Tensor) -> torch.Tensor:
    """(2B, h, w) of B frames then their mirrors -> (B, h, w), each averaged with its mirror's map."""
    half = predicted.shape[0] // 2
    return (predicted[:half] + predicted[half:].flip(-1)) / 2
