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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthd.config import ModelSettings, default_cache_dir
from depthd.domain import (
    Alignment,
    DepthEncoding,
    DepthKind,
    DepthResult,
    Frame,
    Geometry,
    Intrinsics,
    OutputSpec,
    PixelFormat,
    StageTimes,
)
from depthd.engine import backends, colormaps, streams
from depthd.engine.backends import ExportFailed, Forward, OnnxExports, TorchForward
from depthd.engine.backends.export import export_key
from depthd.engine.checkpoints import Checkpoint, checkpoint_files, load_checkpoint
from depthd.engine.encode import EncodedMap, encode
from depthd.engine.geometry import Stabilizer, back_project, centred_intrinsics, colours, fit_to_hints, focal_length_px
from depthd.engine.pixels import to_rgb
from depthd.engine.plan import Plan
from depthd.engine.streams import Timer
from depthd.errors import DepthdError, InvalidArgument, ModelLoadError

logger = logging.getLogger(__name__)

NO_GEOMETRY = Geometry()

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


@dataclass
class _Finished:
    """One frame's outputs on the device, before the copy back."""

    encoded: EncodedMap
    kind: DepthKind
    field_of_view: float | None
    intrinsics: Intrinsics | None
    alignment: Alignment | None
    points: torch.Tensor | None
    points_rgb: torch.Tensor | None


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
    preprocess: Timer
    shared_by: int = 1
    """Frames pre-processed together, sharing the stage's time."""
    rgb: torch.Tensor | None = None
    """uint8 3 x H x W, the frame itself on the device: kept only for coloured point clouds."""
    ready: Any = None
    """The device queue's marker of the end of its pre-processing (a CUDA event; None on a CPU)."""

    @property
    def preprocess_ms(self) -> float:
        return self.preprocess.ms() / self.shared_by

    @property
    def processed(self) -> tuple[int, int]:
        return self.plan.processed

    @property
    def input_size(self) -> tuple[int, int]:
        return self.plan.input_size


class DepthEngine:
    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, settings: ModelSettings,
                 forward: Forward | None = None):
        self.checkpoint = checkpoint
        self.recipe = checkpoint.recipe
        self.device = device
        self.dtype = dtype
        """The precision the network computes in."""
        self.settings = settings
        architecture = checkpoint.architecture
        self.flip = architecture.flip_by_default if settings.flip_augmentation is None else settings.flip_augmentation
        self.kind: DepthKind = architecture.kind(checkpoint.config)
        self._luts: dict[str, torch.Tensor | None] = {}
        self._model: Forward = forward or TorchForward(self._compiled(checkpoint.model), dtype)
        self.input_dtype = self._model.input_dtype
        self.channels_last = settings.channels_last and self.backend == "torch"
        self.queue = streams.for_device(device)

    @classmethod
    def load(cls, settings: ModelSettings) -> "DepthEngine":
        """Load the model `settings` describes; its device, dtype and backend None (or "auto") mean
        the best there is. Under `auto`, a backend that cannot run the network gives way to the next."""
        try:
            device = resolve_device(settings.device)
            if settings.cuda_graphs and device.type != "cuda":
                raise InvalidArgument(f"cuda_graphs: needs a CUDA device, the model is on {device}")
            choices = backends.candidates(settings.backend, device, settings.dtype)
            if settings.compile or settings.cuda_graphs:
                if settings.backend not in (None, "auto", "torch"):
                    raise InvalidArgument(f"compile: torch.compile is torch's; backend {settings.backend} compiles on its own")
                choices = ["torch"]
        except InvalidArgument as error:
            raise ModelLoadError(settings.name, settings.source, str(error)) from error
        for backend in choices:
            try:
                return cls._load_on(backend, settings, device)
            except ExportFailed as error:
                if backend == choices[-1] or settings.backend not in (None, "auto"):
                    raise ModelLoadError(settings.name, settings.source,
                                         f"backend {backend}: {error}; backend torch runs every architecture") from error
                logger.warning("model=%s backend=%s cannot run it (%s): using the next, %s",
                               settings.name, backend, error, choices[choices.index(backend) + 1])
        raise AssertionError("candidates() gives at least torch")

    @classmethod
    def _load_on(cls, backend: str, settings: ModelSettings, device: torch.device) -> "DepthEngine":
        try:
            dtype = backends.precision(settings.dtype, device, backend)
        except InvalidArgument as error:
            raise ModelLoadError(settings.name, settings.source, str(error)) from error
        if backend == "torch":
            checkpoint = load_checkpoint(settings, device, dtype)
            if settings.channels_last:
                checkpoint.model.to(memory_format=torch.channels_last)
            return cls(checkpoint, device, dtype, settings)
        checkpoint = load_checkpoint(settings, device, torch.float32, weights=False)
        cache = Path(settings.cache_dir or default_cache_dir())
        exports = OnnxExports(
            settings.name, cache,
            export_key(checkpoint_files(settings.source), settings.attention),
            lambda: load_checkpoint(settings, torch.device("cpu"), torch.float32).model,
            checkpoint.architecture.estimates_focal_length(checkpoint.config),
        )
        try:
            forward = backends.exported(backend, exports, dtype, torch.get_num_threads(), cache, device)
        except InvalidArgument as error:
            raise ModelLoadError(settings.name, settings.source, str(error)) from error
        engine = cls(checkpoint, device, dtype, settings, forward)
        for height, width in settings.warmup_sizes:
            forward.prepare(engine.processed_size(height, width))
        return engine

    @property
    def backend(self) -> str:
        return self._model.backend

    @property
    def input_size(self) -> int:
        """The processed short side of frames at the checkpoint's (or input_size's) size; 0 where the
        architecture processes frames at their own size."""
        size = self.recipe.config.size
        return min(size) if size and self.recipe.config.do_resize else 0

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
        return 3 * processed[0] * processed[1] * self.input_dtype.itemsize

    @property
    def default_max_batch(self) -> int:
        """On CPU a batch of two costs more than two single frames (docs/performance.md); on CUDA it is nearly free."""
        return 8 if self.device.type == "cuda" else 1

    def check_output(self, spec: OutputSpec, geometry: Geometry | None = None) -> None:
        """Refuse what this model cannot give, before any work is done."""
        geometry = geometry or NO_GEOMETRY
        relative = self.kind.value.replace("_", " ")
        metric = self.kind is DepthKind.METRIC or bool(geometry.hints)
        if spec.encoding is DepthEncoding.UINT16_MM and not metric:
            raise InvalidArgument(
                f"output.encoding: UINT16_MM needs a metric model; {self.name!r} gives {relative}: ask for FLOAT32 or "
                "FLOAT16, or send hints (true depths at a few pixels) to make it metric"
            )
        if spec.point_cloud and not metric:
            raise InvalidArgument(
                f"output.point_cloud: points need metres, and {self.name!r} gives {relative}: send at least 3 hints "
                "(EstimateRequest.hints: true depths at a few pixels, from a LiDAR, a ToF sensor or known points), "
                "or use a metric model"
            )
        if spec.point_cloud and geometry.intrinsics is None and not self.knows_intrinsics:
            raise InvalidArgument(
                "output.point_cloud: no camera intrinsics: set EstimateRequest.intrinsics (fx, fy, cx, cy in pixels of "
                f"the input image), or `intrinsics` in the config of model {self.name!r}"
            )
        if spec.colormap is not None and spec.colormap not in colormaps.NAMES:
            raise InvalidArgument(f"output.colormap: {spec.colormap!r} is not one of {', '.join(colormaps.NAMES)}")
        if spec.width < 0 or spec.height < 0:
            raise InvalidArgument("output.width/height: must be 0 (the input's size) or positive")

    @property
    def knows_intrinsics(self) -> bool:
        """Whether this model has a camera without being told one: from its config, or its own estimate."""
        return self.settings.intrinsics is not None or self.checkpoint.architecture.estimates_focal_length(
            self.checkpoint.config
        )

    def estimate(
        self, frames: list[Frame], specs: list[OutputSpec], geometries: list[Geometry] | None = None
    ) -> list[DepthResult | DepthdError]:
        """Depth for every frame, in order; frames of one processed size share a forward pass."""
        return self.infer(self.prepare(frames, [spec.point_cloud_rgb for spec in specs]), specs, geometries)

    def prepare(self, frames: list[Frame], keep_rgb: list[bool] | None = None) -> list[Prepared]:
        """Pre-process frames on the device, frames of one input size and format as one tensor;
        `keep_rgb` (per frame) keeps the frame itself on the device, for coloured point clouds.

        On CUDA the pool calls this on its decode threads, one frame at a time, so that
        it overlaps the forward pass of the batch before.
        """
        by_input: dict[tuple, list[int]] = defaultdict(list)
        for index, frame in enumerate(frames):
            by_input[(frame.height, frame.width, frame.pixel_format)].append(index)
        prepared: list[Prepared | None] = [None] * len(frames)
        with torch.inference_mode(), self.queue.side():
            for (height, width, pixel_format), indices in by_input.items():
                with self.queue.timer() as took:
                    pixels = self.queue.to_device(torch.stack([torch.from_numpy(frames[i].pixels) for i in indices]))
                    plan = self.recipe.plan(height, width)
                    rgb = to_rgb(pixels, PixelFormat(pixel_format))
                    values = self.recipe.preprocess(rgb, plan, self.input_dtype)
                    if self.channels_last:
                        values = values.contiguous(memory_format=torch.channels_last)
                ready = self.queue.ready()
                for row, index in enumerate(indices):
                    kept = rgb[row] if keep_rgb is not None and keep_rgb[index] else None
                    prepared[index] = Prepared(values[row : row + 1], plan, took, len(indices), kept, ready)
        return prepared

    def infer(
        self,
        prepared: list[Prepared],
        specs: list[OutputSpec],
        geometries: list[Geometry] | None = None,
        stabilizers: list[Stabilizer | None] | None = None,
    ) -> list[DepthResult | DepthdError]:
        """Forward and post-process pre-processed frames, one forward pass per processed size.

        Per frame: its output spec, its geometry (intrinsics, hints, stabilize) and, for a
        stabilized stream's frame, its stream's stabilizer. A frame that cannot have what it
        asked for (points when its hints did not make it metric) gets its error, in its place."""
        if len(prepared) != len(specs):
            raise ValueError("one OutputSpec per frame")
        geometries = geometries or [NO_GEOMETRY] * len(specs)
        stabilizers = stabilizers or [None] * len(specs)
        for spec, geometry in zip(specs, geometries):
            self.check_output(spec, geometry)
        with torch.inference_mode():
            for item in prepared:
                self.queue.wait(item.ready, item.pixel_values)
                if item.rgb is not None:
                    self.queue.wait(None, item.rgb)
            with self.queue.timer() as inference:
                groups = self._forward(prepared)
            with self.queue.timer() as postprocess:
                finished = self._postprocess(groups, prepared, specs, geometries, stabilizers)
                copies = [item if isinstance(item, DepthdError) else self._copy_back(item) for item in finished]
            self.queue.finish()
            results = [copy if isinstance(copy, DepthdError) else self._to_host(item, copy, spec)
                       for item, copy, spec in zip(finished, copies, specs)]
        for item, result in zip(prepared, results):
            if isinstance(result, DepthResult):
                result.timing = StageTimes(item.preprocess_ms, inference.ms(), postprocess.ms(), len(prepared))
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
            outputs = self._model(batch)
            predicted, fov = outputs.predicted_depth, outputs.field_of_view
            if self.flip:
                predicted = _average_flipped(predicted)
                fov = None if fov is None else fov.view(2, -1).mean(0)
            groups.append(_Group(indices, predicted, None if fov is None else fov.flatten()))
        return groups

    def _postprocess(
        self,
        groups: list[_Group],
        prepared: list[Prepared],
        specs: list[OutputSpec],
        geometries: list[Geometry],
        stabilizers: list[Stabilizer | None],
    ) -> list[_Finished | DepthdError]:
        """The recipe's post-processing, then per frame, in batch order (so that a stream's frames
        reach its stabilizer in order): the geometry and the encoding asked for."""
        out: list[_Finished | DepthdError | None] = [None] * len(specs)
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
                    frame_fov = None if fov is None else float(fov[row])
                    try:
                        out[index] = self._finish(depth[row], prepared[index], specs[index], geometries[index],
                                                  stabilizers[index], frame_fov)
                    except DepthdError as error:
                        out[index] = error
        return out

    def _finish(
        self,
        depth: torch.Tensor,
        item: Prepared,
        spec: OutputSpec,
        geometry: Geometry,
        stabilizer: Stabilizer | None,
        fov: float | None,
    ) -> _Finished:
        """One frame's map: fitted to its hints or stabilized, its points, encoded as asked."""
        kind, alignment = self.kind, None
        if geometry.hints:
            fitted = fit_to_hints(depth, kind, geometry.hints, item.input_size)
            alignment = fitted.alignment
            if alignment.applied:
                depth, kind = fitted.depth, DepthKind.METRIC
        elif stabilizer is not None and kind is not DepthKind.METRIC:
            depth = stabilizer(depth)
        intrinsics = self._intrinsics(geometry, item.input_size, tuple(depth.shape), fov)
        if kind is not DepthKind.METRIC and (spec.point_cloud or spec.encoding is DepthEncoding.UINT16_MM):
            raise InvalidArgument(
                f"hints: only {alignment.hints_used} of the {len(geometry.hints)} hints were usable (at least 3 agreeing "
                "ones are needed), so this frame's depth is not metric and "
                + ("output.point_cloud" if spec.point_cloud else "UINT16_MM") + " cannot be given"
            )
        points = points_rgb = None
        if spec.point_cloud:
            points = back_project(depth, intrinsics, spec.point_stride)
            if spec.point_cloud_rgb and item.rgb is not None:
                points_rgb = colours(item.rgb, tuple(depth.shape), spec.point_stride)
        lut = self._lut(spec.colormap)
        encoded = encode(depth, kind, spec.encoding, spec.visualization, lut, spec.vis_range)
        return _Finished(encoded, kind, fov, intrinsics, alignment, points, points_rgb)

    def _intrinsics(
        self, geometry: Geometry, input_size: tuple[int, int], map_size: tuple[int, int], fov: float | None
    ) -> Intrinsics | None:
        """The request's intrinsics, else the model's configured ones, else (Depth Pro) its own
        focal length with the principal point at the centre: scaled to the returned map."""
        known = geometry.intrinsics or self.settings.intrinsics
        if known is None and fov is not None:
            known = centred_intrinsics(focal_length_px(fov, input_size[1]), *input_size)
        return None if known is None else known.scaled(input_size, map_size)

    def _copy_back(self, item: _Finished) -> dict[str, torch.Tensor]:
        """Start copying a frame's outputs to the host (asynchronous on CUDA: valid after `finish`)."""
        tensors = {"stats": item.encoded.stats, "depth": item.encoded.depth, "vis": item.encoded.visualization,
                   "points": item.points, "points_rgb": item.points_rgb}
        return {name: self.queue.to_host(tensor) for name, tensor in tensors.items() if tensor is not None}

    def _to_host(self, item: _Finished, copies: dict[str, torch.Tensor], spec: OutputSpec) -> DepthResult:
        lo, hi = copies["stats"].tolist()
        depth = copies["depth"].numpy()
        vis = copies["vis"].numpy() if "vis" in copies else None
        fov = item.field_of_view
        return DepthResult(
            depth=depth,
            encoding=spec.encoding,
            kind=item.kind,
            min=lo,
            max=hi,
            visualization=vis,
            field_of_view=fov,
            focal_length=None if fov is None else focal_length_px(fov, depth.shape[1]),
            intrinsics=item.intrinsics,
            points=copies["points"].numpy() if "points" in copies else None,
            points_rgb=copies["points_rgb"].numpy() if "points_rgb" in copies else None,
            alignment=item.alignment,
        )

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


def _average_flipped(predicted: torch.Tensor) -> torch.Tensor:
    """(2B, h, w) of B frames then their mirrors -> (B, h, w), each averaged with its mirror's map."""
    half = predicted.shape[0] // 2
    return (predicted[:half] + predicted[half:].flip(-1)) / 2
