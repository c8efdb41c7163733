"""`depthctl`: estimate, stream, list models and check health against a running depthd, over TLS
(and mTLS) and with a token when the daemon asks for them; depth maps, visualizations and point clouds
(PLY) as files, with the camera's intrinsics and true depths at a few pixels (hints) sent along."""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from depthd_client import bags, files, sources, video
from depthd_client.channels import read_token_file
from depthd_client.client import DEFAULT_TARGET, DepthClient, DepthdError
from depthd_client.messages import DepthResult, StreamFrame
from depthd_client.progress import Tally

COLORMAPS = ("gray", "turbo", "inferno")
VIS_FORMATS = ("vis", "mp4")
STREAM_FORMATS = files.FORMATS + ("mp4",)
ABORTING = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED}
"""Failures of `estimate` that no other image would escape: they end the run instead of being counted."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthctl", description="Talk to a running depthd daemon.")
    parser.add_argument("--target", default=os.environ.get("DEPTHD_TARGET", DEFAULT_TARGET),
                        help=f"host:port or unix:///path (default $DEPTHD_TARGET or {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    security = parser.add_argument_group(
        "TLS and tokens", "TLS is for host:port targets; a unix socket stays plaintext, guarded by its file permissions. "
        "The token is the first non-empty line (# comments skipped) of --token-file, else of the file "
        "$DEPTHD_TOKEN_FILE names, "
        "else $DEPTHD_TOKEN itself; it is sent as `authorization: Bearer <token>`.")
    security.add_argument("--tls-ca", metavar="FILE", help="PEM: the CA that signed the daemon's certificate (turns TLS on)")
    security.add_argument("--tls-cert", metavar="FILE", help="PEM: a client certificate, for a daemon that asks for one (mTLS)")
    security.add_argument("--tls-key", metavar="FILE", help="PEM: the private key of --tls-cert")
    security.add_argument("--token-file", metavar="FILE",
                          help="a file whose first non-empty line (# comments skipped) is the token")
    commands = parser.add_subparsers(dest="command", required=True)

    def outputs(sub: argparse.ArgumentParser, forms: tuple[str, ...] = files.FORMATS) -> None:
        sub.add_argument("-o", "--output", metavar="DIR",
                         help="write a file per image into DIR, named after its path relative to the folder the "
                              "inputs share (a/f.jpg -> DIR/a/f.depth.npy)")
        sub.add_argument("--format", choices=forms,
                         help="npy: float32 map; png16: 16-bit PNG (millimetres if metric, else stretched); "
                              "vis: 8-bit visualization PNG; ply: binary point cloud, metres in the camera's "
                              "optical frame (needs metric depth, or --hints, and a camera)"
                              + ("; mp4: one visualization video of the whole source, beside it "
                                 "(or in DIR), with one colour range throughout" if "mp4" in forms else "")
                              + " (default npy; needs -o" + (", but for mp4)" if "mp4" in forms else ")"))
        sub.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
        sub.add_argument("--model", default="", help="a model name from `depthctl models` (default: the daemon's)")
        sub.add_argument("--colormap", choices=COLORMAPS, help="for --format vis or mp4 (default: the daemon's)")
        sub.add_argument("--vis-range", type=_numbers("MIN,MAX", 2), metavar="MIN,MAX",
                         help="for --format vis or mp4: a fixed colour range in the map's unit (default: each "
                              "frame's own for vis; the first frame's for mp4)")
        geometry = sub.add_argument_group("geometry")
        geometry.add_argument("--intrinsics", type=_numbers("fx,fy,cx,cy", 4), metavar="fx,fy,cx,cy",
                              help="the camera, in pixels of the input images (default: the model's configured one)")
        geometry.add_argument("--hints", type=_hints, metavar="FILE.csv",
                              help="true depths, a line x,y,depth_m each (pixels, metres; a header line allowed), "
                                   "sent with every image: makes a relative model's map metric")
        geometry.add_argument("--point-stride", type=_stride, metavar="N",
                              help="for --format ply: every N-th row and column (default: every pixel)")
        geometry.add_argument("--rgb", action="store_true", help="for --format ply: the points' colours too")

    estimate = commands.add_parser("estimate", help="depth for each image, one call each; a failed image is "
                                                    "reported and the others go on")
    estimate.add_argument("images", nargs="+", metavar="IMG")
    outputs(estimate)

    stream = commands.add_parser("stream", help="stream a folder, a glob, a video file or a camera, with a progress "
                                                "bar and fps")
    stream.add_argument("source", metavar="SOURCE",
                        help="a folder or glob of images, a video file (mp4, mkv, avi, ...) or a camera (/dev/video0); "
                             "video needs PyAV: pip install 'depthd-client[video]'")
    stream.add_argument("-r", "--recursive", action="store_true", help="search the folder's subfolders too (** in a glob)")
    stream.add_argument("--fps", type=_positive, metavar="N", help="send at most N frames a second, like a camera")
    stream.add_argument("--latest-frame-wins", action="store_true",
                        help="let the daemon skip frames that wait while a newer one arrives")
    stream.add_argument("--stabilize", action="store_true",
                        help="align each frame of a relative model to the stream's running reference: no flicker")
    outputs(stream, STREAM_FORMATS)

    bags.add_parser(commands)

    models = commands.add_parser("models", help="the models the daemon serves")
    models.add_argument("--stats", action="store_true",
                        help="also frames answered and dropped, the queue's peak and the batch-size histogram")
    health = commands.add_parser("health", help="SERVING or NOT_SERVING (exit 0 only when SERVING)")
    health.add_argument("--model", default="", help="one model's health instead of the daemon's")
    health.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds for SERVING")
    return parser


def _numbers(form: str, count: int) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: `count` comma-separated numbers, as `form` says."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(cell) for cell in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {form} ({count} numbers), got {text!r}")
        return values

    return parse


def _hints(path: str) -> np.ndarray:
    try:
        return files.read_hints(path)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _stride(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say by itself: the flags that need another. An option that would do nothing
    is an error, not a silent no-op."""
    if args.command not in ("estimate", "stream"):
        return
    form = args.format or "npy"
    for flag, value, forms in (("--rgb", args.rgb, ("ply",)), ("--point-stride", args.point_stride, ("ply",)),
                               ("--colormap", args.colormap, VIS_FORMATS), ("--vis-range", args.vis_range, VIS_FORMATS)):
        if value and form not in forms:
            offered = STREAM_FORMATS if args.command == "stream" else files.FORMATS
            parser.error(f"{flag} goes with --format {' or '.join(f for f in forms if f in offered)}")
    if form == "mp4":
        if video.is_camera(args.source) and not args.output:
            parser.error("--format mp4 of a camera needs -o DIR: there is no folder beside it")
    elif not args.output:
        given = f"--format {args.format}" if args.format else "--overwrite" if args.overwrite else ""
        if given:
            parser.error(f"{given} writes files: give -o DIR")
    args.format = form


def _request_options(client: DepthClient, args: argparse.Namespace, folder: Path | None) -> dict[str, Any]:
    """What each image of `estimate` or `stream` asks for: the model, the camera, and what the files need."""
    options: dict[str, Any] = {"model": args.model}
    if args.colormap:
        options["colormap"] = args.colormap
    if args.format == "mp4":
        options["visualization"] = True
    elif folder:
        options.update(files.request_options(args.format, _is_metric(client, args.model)))
        if args.format == "ply":
            options.update(point_cloud_rgb=args.rgb, point_stride=args.point_stride or 0)
    if args.intrinsics:
        options["intrinsics"] = args.intrinsics
    if args.vis_range:
        options["vis_min"], options["vis_max"] = args.vis_range
    if getattr(args, "stabilize", False):
        options["stabilize"] = True
    return options


def _is_metric(client: DepthClient, model: str) -> bool:
    for info in client.models():
        if info.name == model or (not model and info.is_default):
            return info.kind == "metric"
    return False


def _estimate(client: DepthClient, args: argparse.Namespace) -> int:
    folder = _output_folder(args)
    options = _request_options(client, args, folder)
    failures: list[str] = []
    for image, name in zip(args.images, sources.names([Path(i) for i in args.images])):
        try:
            result = client.estimate(image, hints=args.hints, **options)
            line = _describe(image, result)
            if folder:
                path = files.output_path(name, folder, args.format)
                files.write(result, path, args.format, args.overwrite)
                line += f" -> {path}"
            print(line)
        except DepthdError as error:
            if error.code in ABORTING:
                raise
            failures.append(f"{image}: {error.code.name}: {error.details}")
            print(f"depthctl: {failures[-1]}", file=sys.stderr)
        except (OSError, ValueError) as error:
            failures.append(f"{image}: {error}")
            print(f"depthctl: {failures[-1]}", file=sys.stderr)
    if failures:
        print(f"depthctl: {len(failures)} of {len(args.images)} images failed:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0


def _describe(image: str, result: DepthResult) -> str:
    line = f"{image}: {result.kind}, {result.depth.shape[1]}x{result.depth.shape[0]}, " \
           f"{result.min:.3f}..{result.max:.3f}, {result.timing.total_ms:.1f} ms"
    if result.alignment is not None:
        a = result.alignment
        line += f", hints {a.hints_used} used {a.hints_rejected} rejected (rmse {a.rmse_m:.3f} m)"
    return line


def _stream(client: DepthClient, args: argparse.Namespace) -> int:
    source = sources.open_source(args.source, args.recursive)
    folder = _output_folder(args)
    try:
        frames = iter(source)
        if args.fps:
            frames = sources.paced(frames, args.fps)
        options = _request_options(client, args, folder)
        sink = _sink(client, args, source, folder, frames, options)
        if sink.first is not None:
            frames = itertools.chain([sink.first], frames)
        return _run_stream(client, args, frames, options, sink, Tally(total=source.total))
    finally:
        source.close()


def _run_stream(client: DepthClient, args: argparse.Namespace, frames: Iterator[sources.Frame],
                options: dict[str, Any], sink: _FileSink | _VideoSink, tally: Tally) -> int:
    """Send the frames over one stream and write each result: a daemon that goes away mid-stream (a
    SIGTERM, a restart) ends it with what was finished said first."""
    sent: collections.deque[sources.Frame] = collections.deque()

    def requests() -> Iterator[StreamFrame]:
        for frame in frames:
            sent.append(frame)
            yield StreamFrame(frame.image, timestamp_ns=frame.timestamp_ns, hints=args.hints)

    try:
        for result in client.stream(requests(), latest_frame_wins=args.latest_frame_wins, **options):
            frame = sent.popleft()
            tally.add(result)
            if result.error is not None:
                print(f"\n{frame.name}: {result.error.code.name}: {result.error.message}", file=sys.stderr)
            sink.write(frame, result)
            tally.show()
    except (DepthdError, OSError) as error:
        tally.done()
        print(f"depthctl: stopped after {tally.frames} frames: {error}", file=sys.stderr)
        return 1
    finally:
        sink.close()
    tally.done()
    if sink.path:
        print(f"depthctl: wrote {sink.path}", file=sys.stderr)
    return 1 if tally.failed else 0


class _FileSink:
    """A stream's results as a file per frame into -o DIR, or nowhere (the summary alone) without it."""

    first: sources.Frame | None = None
    path: Path | None = None

    def __init__(self, args: argparse.Namespace, folder: Path | None):
        self._args = args
        self._folder = folder

    def write(self, frame: sources.Frame, result: DepthResult) -> None:
        if self._folder and result.ok and not result.dropped:
            files.write(result, files.output_path(frame.name, self._folder, self._args.format), self._args.format,
                        self._args.overwrite)

    def close(self) -> None:
        pass


class _VideoSink:
    """A stream's visualizations as one H.264 mp4, at the source's rate. A frame without a picture
    (dropped or failed) repeats the one before, so the video keeps the source's timing. `first` is the
    frame taken from the source to fix the colour range, to be sent first."""

    def __init__(self, path: Path, fps: float, first: sources.Frame):
        self.first = first
        self.path = path
        self._writer = video.Mp4Writer(path, fps)
        self._last: np.ndarray | None = None

    def write(self, frame: sources.Frame, result: DepthResult) -> None:
        if result.visualization_png:
            self._last = video.decode_png(result.visualization_png)
        if self._last is not None:
            self._writer.write(self._last)

    def close(self) -> None:
        self._writer.close()


def _sink(client: DepthClient, args: argparse.Namespace, source: sources.Source, folder: Path | None,
          frames: Iterator[sources.Frame], options: dict[str, Any]) -> _FileSink | _VideoSink:
    """The sink for --format; for mp4, the colour range is fixed for the whole video (--vis-range, else the
    first frame's, asked for on its own before the stream opens) and set in `options`."""
    if args.format != "mp4":
        return _FileSink(args, folder)
    path = _video_path(args, folder)
    if path.exists() and not args.overwrite:
        raise FileExistsError(f"{path} exists (--overwrite replaces it)")
    first = next(frames, None)
    if first is None:
        raise OSError(f"no frames in {args.source}")
    if not args.vis_range:
        result = client.estimate(first.image, model=args.model, hints=args.hints, intrinsics=args.intrinsics)
        options["vis_min"], options["vis_max"] = result.min, result.max
        print(f"depthctl: colour range {result.min:.3f}..{result.max:.3f} (the first frame's; --vis-range sets it)",
              file=sys.stderr)
    return _VideoSink(path, args.fps or source.fps or 10.0, first)


def _video_path(args: argparse.Namespace, folder: Path | None) -> Path:
    """`<source>.depth.mp4` in -o DIR, else beside the source (a folder's or glob's: beside its folder)."""
    source = Path(args.source)
    if not video.is_video(args.source) and not source.is_dir():
        source = Path(os.path.commonpath([str(p.parent) for p in sources.image_files(args.source, args.recursive)]))
    name = (source.stem if video.is_video(args.source) else source.resolve().name) + ".depth.mp4"
    return (folder or source.resolve().parent) / name


def _output_folder(args: argparse.Namespace) -> Path | None:
    if not args.output:
        return None
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _models(client: DepthClient, stats: bool = False) -> int:
    for m in client.models():
        flags = [f for f, on in (("default", m.is_default), ("ready", m.ready), ("DEMO", m.demo)) if on]
        print(f"{m.name}\t{m.architecture or '-'}\t{m.kind or '-'}\t{m.device or '-'}\t{m.dtype or '-'}\t"
              f"{m.backend or '-'}\t{m.input_size or 'own size'}\t"
              f"{','.join(flags) or 'loading'}\t{m.source}" + (f"\t{m.note}" if m.note else ""))
        if stats:
            batches = " ".join(f"{size}:{count}" for size, count in m.batch_sizes.items()) or "-"
            print(f"  frames {m.frames_total}, dropped {m.frames_dropped}, queue peak {m.queue_peak}, "
                  f"batches (size:passes, max {m.max_batch}) {batches}")
    return 0


def _health(client: DepthClient, args: argparse.Namespace) -> int:
    service = f"depthd.v1.DepthEstimator/{args.model}" if args.model else ""
    if args.wait:
        try:
            client.wait_until_serving(args.wait, service)
        except DepthdError:
            pass
    status = client.health(service)
    print(status)
    return 0 if status == "SERVING" else 1


def resolve_token(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The token depthctl sends: the first non-empty line of `--token-file`, else of the file
    `$DEPTHD_TOKEN_FILE` names, else `$DEPTHD_TOKEN` itself; None without any (an empty variable counts
    as unset). A file that cannot be read is an OSError, one without a token a ValueError."""
    if token_file is not None:
        return read_token_file(token_file)
    if environ.get("DEPTHD_TOKEN_FILE"):
        return read_token_file(environ["DEPTHD_TOKEN_FILE"])
    token = environ.get("DEPTHD_TOKEN", "").strip()
    return token or None


def _connect(args: argparse.Namespace) -> DepthClient:
    token = resolve_token(args.token_file, os.environ)
    return DepthClient(args.target, timeout=args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, token=token)


def _hint(error: DepthdError, args: argparse.Namespace) -> str:
    """What to try, for the failures a security set-up causes; gRPC's own details do not say."""
    if error.code is grpc.StatusCode.UNAUTHENTICATED:
        return " (give the daemon's token with --token-file, $DEPTHD_TOKEN_FILE or $DEPTHD_TOKEN)"
    if error.code is grpc.StatusCode.UNAVAILABLE and not args.target.startswith("unix"):
        if args.tls_ca or args.tls_cert:
            return (" (is the daemon running there, and do --tls-ca, --tls-cert and --tls-key fit its certificate "
                    "and client CA? a refused TLS handshake reads the same)")
        return " (is the daemon running there? if it speaks TLS, give --tls-ca)"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        client = _connect(args)
    except (OSError, ValueError) as error:  # a token or PEM file that cannot be read, options that do not fit
        print(f"depthctl: {error}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.command == "estimate":
                return _estimate(client, args)
            if args.command == "stream":
                return _stream(client, args)
            if args.command == "bag":
                return bags.run(client, args)
            if args.command == "models":
                return _models(client, args.stats)
            return _health(client, args)
        except DepthdError as error:
            print(f"depthctl: {error}{_hint(error, args)}", file=sys.stderr)
            return 1
        except (OSError, ImportError) as error:  # a file that cannot be read or written, PyAV missing
            print(f"depthctl: {error}", file=sys.stderr)
            return 2
        except ValueError as error:  # an answer that lacks what the file needs (a daemon without point clouds)
            print(f"depthctl: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
