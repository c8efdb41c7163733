"""`depthd`: the daemon's command line (serve, check-config)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from depthd import __version__
from depthd.config import BACKENDS, DEMO_MODEL, DTYPES, ConfigError, Settings, load_settings, model_from_argument


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthd", description="Serve monocular depth estimation over gRPC.")
    parser.add_argument("--version", action="version", version=f"depthd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="load and warm the models, then serve them")
    serve.add_argument("--config", metavar="FILE", help="YAML settings (see systemd/depthd.yaml)")
    serve.add_argument("--listen", action="append", metavar="ADDR",
                       help="host:port or unix:/path; repeatable (default 127.0.0.1:50051)")
    serve.add_argument("--model", action="append", metavar="NAME=SOURCE",
                       help="a hub id or folder to serve, optionally named; repeatable; the first is the default")
    serve.add_argument("--default", metavar="NAME", help="the model served when a request names none")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N, for every model (default auto)")
    serve.add_argument("--dtype", choices=DTYPES,
                       help="for every model (default auto: float16 on CUDA, bfloat16 on a CPU with AMX or "
                            "AVX-512-BF16, else float32)")
    serve.add_argument("--backend", choices=BACKENDS,
                       help="what runs every model's network (default auto: OpenVINO on an x86 CPU when installed)")
    serve.add_argument("--cache-dir", metavar="DIR", help="where exported and compiled networks are kept")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--tls-cert", metavar="FILE", help="TLS on the TCP addresses: the server's certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    serve.add_argument("--tls-client-ca", metavar="FILE",
                       help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument("--auth-token-file", metavar="FILE",
                       help="tokens, one per line: every call but health needs `authorization: Bearer <token>`")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (a bare PORT: on "
                            "127.0.0.1; default: off)")
    serve.add_argument("--demo", action="store_true",
                       help=f"also serve {DEMO_MODEL!r}: a tiny Depth Anything with RANDOM weights, built offline, "
                            "to smoke-test an install (its depth means nothing)")

    check = commands.add_parser("check-config", help="validate a settings file without loading any model")
    check.add_argument("file")

    install = commands.add_parser("install-service", help="install the systemd unit (and an example config) for this depthd")
    install.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    install.add_argument("--prefix", default="/", help="write under this root instead of / (for packaging)")
    uninstall = commands.add_parser("uninstall-service", help="remove what install-service wrote")
    uninstall.add_argument("--prefix", default="/", help="the root install-service wrote under")
    return parser


def _flags(args: argparse.Namespace) -> dict:
    flags: dict = {}
    if args.listen:
        flags["listen"] = args.listen
    if args.model:
        flags["models"] = [model_from_argument(m) for m in args.model]
    if args.demo:
        flags["demo"] = True
    for key in ("default", "device", "dtype", "backend", "cache_dir", "log_level", "log_format", "metrics_listen"):
        value = getattr(args, key)
        if value is not None:
            flags["default_model" if key == "default" else key] = value
    tls = {key: value for key, value in (("cert", args.tls_cert), ("key", args.tls_key), ("client_ca", args.tls_client_ca))
           if value is not None}
    if tls:
        flags["tls"] = tls
    if args.auth_token_file is not None:
        flags["auth"] = {"token_file": args.auth_token_file}
    return flags


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, os.environ, _flags(args))
    except ConfigError as error:
        print(f"depthd: {error}", file=sys.stderr)
        return 2
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Spinning threads
    # lose their core to any other busy process and every parallel region waits for them:
    # measured, beside one busy process, 2.67 s a forward pass spinning, 2.08 s sleeping
    # (Depth Anything V2 Small, 2 cores; docs/performance.md), and 2% slower on an idle machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from depthd.ops import logs
    from depthd.ops.daemon import serve

    logs.configure(settings.log_level, settings.log_format)
    scratch = None
    try:
        if settings.demo:
            from depthd.engine import synthetic

            scratch = Path(tempfile.mkdtemp(prefix="depthd-demo-"))
            settings = settings.with_demo_model(synthetic.build("depth_anything", scratch / DEMO_MODEL))
        ended = asyncio.run(serve(settings))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if ended.workers_left:
        # A thread still inside torch would abort the interpreter's exit ("terminate called
        # without an active exception", SIGABRT): end the process here, the answers all sent.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ended.code)
    return ended.code


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file, os.environ, {})
    except ConfigError as error:
        print(f"depthd: {error}", file=sys.stderr)
        return 2
    problems = _missing_folders(settings)
    for problem in problems:
        print(f"depthd: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"{args.file}: valid")
    print(f"  listen: {', '.join(settings.listen)}")
    if settings.metrics_listen:
        print(f"  metrics: http://{settings.metrics_listen}/metrics")
    for m in map(settings.resolved, settings.models):
        default = " (default)" if m.name == settings.default else ""
        print(f"  model {m.name}{default}: {m.source} on {m.device}, {m.dtype}, backend {m.backend}, "
              f"input size {m.input_size or 'the checkpoint own'}, "
              f"batch <= {m.max_batch or 'the device default'}, warm-up {', '.join(f'{w}x{h}' for h, w in m.warmup_sizes)}")
    return 0


def _missing_folders(settings: Settings) -> list[str]:
    problems = []
    for i, m in enumerate(settings.models):
        if m.source.startswith(("/", ".", "~")) and not Path(m.source).expanduser().is_dir():
            problems.append(f"models[{i}].source: no such folder {m.source!r}")
    return problems


def _service(args: argparse.Namespace) -> int:
    from depthd.ops import install

    try:
        if args.command == "install-service":
            return install.install(Path(args.prefix), dry_run=args.dry_run)
        return install.uninstall(Path(args.prefix))
    except (install.InstallError, OSError) as error:
        print(f"depthd: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    return _service(args)


if __name__ == "__main__":
    raise SystemExit(main())
