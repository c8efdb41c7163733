"""`depthctl`: estimate, stream, list models and check health against a running depthd, over TLS
(and mTLS) and with a token when the daemon asks for them; depth maps, visualizations and point clouds
(PLY) as files, with the camera's intrinsics and true depths at a few pixels (hints) sent along."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from depthd_client import files
from depthd_client.channels import read_token_file
from depthd_client.client import DEFAULT_TARGET, DepthClient, DepthdError
from depthd_client.messages import StreamFrame

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


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

    def outputs(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-o", "--output", metavar="DIR", help="write a file per image into DIR")
        sub.add_argument("--format", choices=files.FORMATS, default="npy",
                         help="npy: float32 map; png16: 16-bit PNG (millimetres if metric, else stretched); "
                              "vis: 8-bit visualization PNG; ply: binary point cloud, metres in the camera's "
                              "optical frame (needs metric depth, or --hints, and a camera) (default npy)")
        sub.add_argument("--model", default="", help="a model name from `depthctl models` (default: the daemon's)")
        sub.add_argument("--colormap", default="", help="for --format vis: gray, turbo or inferno")
        sub.add_argument("--vis-range", type=_numbers("MIN,MAX", 2), metavar="MIN,MAX",
                         help="for --format vis: a fixed colour range in the map's unit (default: each frame's own)")
        geometry = sub.add_argument_group("geometry")
        geometry.add_argument("--intrinsics", type=_numbers("fx,fy,cx,cy", 4), metavar="fx,fy,cx,cy",
                              help="the camera, in pixels of the input images (default: the model's configured one)")
        geometry.add_argument("--hints", type=_hints, metavar="FILE.csv",
                              help="true depths, a line x,y,depth_m each (pixels, metres; a header line allowed), "
                                   "sent with every image: makes a relative model's map metric")
        geometry.add_argument("--point-stride", type=_stride, metavar="N",
                              help="for --format ply: every N-th row and column (default: every pixel)")
        geometry.add_argument("--rgb", action="store_true", help="for --format ply: the points' colours too")

    estimate = commands.add_parser("estimate", help="depth for each image, one call each")
    estimate.add_argument("images", nargs="+", metavar="IMG")
    outputs(estimate)

    stream = commands.add_parser("stream", help="stream a folder or glob of images, with a progress bar and fps")
    stream.add_argument("source", metavar="DIR_OR_GLOB")
    stream.add_argument("--latest-frame-wins", action="store_true",
                        help="let the daemon skip frames that wait while a newer one arrives")
    stream.add_argument("--stabilize", action="store_true",
                        help="align each frame of a relative model to the stream's running reference: no flicker")
    outputs(stream)

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


def _stride(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say by itself: the flags that need another."""
    if args.command in ("estimate", "stream") and args.format != "ply":
        given = [flag for flag, value in (("--rgb", args.rgb), ("--point-stride", args.point_stride)) if value]
        if given:
            parser.error(f"{' and '.join(given)} go with --format ply")


def _request_options(client: DepthClient, args: argparse.Namespace, folder: Path | None) -> dict[str, Any]:
    """What each image of `estimate` or `stream` asks for: the model, the camera, and what the files need."""
    options: dict[str, Any] = {"model": args.model, "colormap": args.colormap}
    if folder:
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
    for image in args.images:
        result = client.estimate(image, hints=args.hints, **options)
        line = f"{image}: {result.kind}, {result.depth.shape[1]}x{result.depth.shape[0]}, " \
               f"{result.min:.3f}..{result.max:.3f}, {result.timing.total_ms:.1f} ms"
        if result.alignment is not None:
            a = result.alignment
            line += f", hints {a.hints_used} used {a.hints_rejected} rejected (rmse {a.rmse_m:.3f} m)"
        if folder:
            path = files.output_path(image, folder, args.format)
            files.write(result, path, args.format)
            line += f" -> {path}"
        print(line)
    return 0


def _stream(client: DepthClient, args: argparse.Namespace) -> int:
    paths = _images(args.source)
    if not paths:
        print(f"depthctl: no images in {args.source}", file=sys.stderr)
        return 2
    folder = _output_folder(args)
    options = _request_options(client, args, folder)
    started = time.monotonic()
    latencies, failed, dropped = [], 0, 0
    frames = (StreamFrame(path.read_bytes(), hints=args.hints) for path in paths)
    results = client.stream(frames, latest_frame_wins=args.latest_frame_wins, **options)
    for count, (path, result) in enumerate(zip(paths, results), start=1):
        if result.error is not None:
            failed += 1
            print(f"\n{path}: {result.error.code.name}: {result.error.message}", file=sys.stderr)
        elif result.dropped:
            dropped += 1
        else:
            latencies.append(result.timing.total_ms)
            if folder:
                files.write(result, files.output_path(path, folder, args.format), args.format)
        _progress(count, len(paths), time.monotonic() - started)
    elapsed = time.monotonic() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    print(f"{len(paths)} frames in {elapsed:.2f} s: {len(paths) / elapsed:.1f} fps, "
          f"p50 {p50:.1f} ms in the daemon, {dropped} dropped, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _progress(done: int, total: int, elapsed: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total)
    fps = done / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {fps:.1f} fps")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _images(source: str) -> list[Path]:
    if Path(source).is_dir():
        candidates = Path(source).iterdir()
    else:
        candidates = (Path(p) for p in glob.glob(source))
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


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
            if args.command == "models":
                return _models(client, args.stats)
            return _health(client, args)
        except DepthdError as error:
            print(f"depthctl: {error}{_hint(error, args)}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"depthctl: {error}", file=sys.stderr)
            return 2
        except ValueError as error:  # an answer that lacks what the file needs (a daemon without point clouds)
            print(f"depthctl: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
