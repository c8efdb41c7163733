"""The one typed settings model, read from the YAML file, then `DEPTHD_*` environment, then flags.

Each setting is defined once, in the dataclass field that holds it: its default, its
documentation and its check (the `setting(...)` metadata). Validation walks the fields,
so a new setting is one field here. An error names the key, where its value came from
and what is allowed. Nothing reads configuration at import time: `load_settings` is
handed the file, the environment and the flags explicitly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from depthd.domain import Intrinsics
from depthd.errors import InvalidArgument
from depthd_client import MAX_MESSAGE_BYTES_CEILING

MIB = 1024 * 1024
DEFAULT_LISTEN = "127.0.0.1:50051"
DEMO_MODEL = "demo"
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
"""`auto`: float16 on CUDA, float32 on CPU."""
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which and where from."""


class Problem(ValueError):
    """What is wrong with one value; the validator adds the key and where the value came from."""


# --- checks: each turns a raw value (YAML, environment text) into the setting's value, or says why not


Check = Callable[[Any], Any]


def whole(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        try:
            number = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or not low <= number <= high:
            raise Problem(f"must be a whole number from {low} to {high}, got {value!r}")
        return number

    return check


def number(low: float, high: float) -> Check:
    def check(value: Any) -> float:
        try:
            result = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            result = None
        if result is None or not low <= result <= high:
            raise Problem(f"must be a number from {low:g} to {high:g}, got {value!r}")
        return result

    return check


def flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise Problem(f"must be true or false, got {value!r}")


def one_of(*allowed: str) -> Check:
    def check(value: Any) -> str:
        text = str(value).lower() if value is not None else None
        if text not in allowed:
            raise Problem(f"must be one of {', '.join(allowed)}, got {value!r}")
        return text

    return check


def device(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise Problem(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Problem("is required (a non-empty string)")
    if not NAME_PATTERN.match(value):
        raise Problem(f"must be 1-64 of letters, digits, '.', '_', '-', got {value!r}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Problem("is required (a non-empty string)")
    return value


def readable_file(value: Any) -> str:
    """A path to a file this process can read (a certificate, a key, a token file)."""
    if not isinstance(value, str) or not value:
        raise Problem("must be the path of a file")
    path = Path(value).expanduser()
    if not path.is_file():
        raise Problem(f"no such file {value!r}")
    if not os.access(path, os.R_OK):
        raise Problem(f"{value!r} is not readable by this user (permission denied)")
    return str(path)


def group(value: Any) -> str:
    """The name of a group that exists on this system."""
    import grp

    if not isinstance(value, str) or not value:
        raise Problem("must be a group name")
    try:
        grp.getgrnam(value)
    except KeyError:
        raise Problem(f"no group named {value!r} on this system (`depthd install-service` creates 'depthd')") from None
    return value


def intrinsics(value: Any) -> Intrinsics:
    """A fixed camera: {fx, fy, cx, cy} in pixels of its images."""
    if not isinstance(value, dict) or set(value) != {"fx", "fy", "cx", "cy"}:
        raise Problem(f"must be a mapping of fx, fy, cx and cy (pixels), got {value!r}")
    numbers = {key: number(-1e9, 1e9)(value[key]) for key in ("fx", "fy", "cx", "cy")}
    try:
        return Intrinsics(**numbers).check("")
    except InvalidArgument as error:
        raise Problem(str(error).lstrip(".")) from None


def metrics_address(value: Any) -> str | None:
    """host:port for the /metrics endpoint; a bare port is on loopback; None or "": no endpoint."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Problem(f"must be host:port (port 0-65535), got {value!r}")
    address = str(value)
    if address.isdecimal():
        address = f"127.0.0.1:{address}"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise Problem(f"must be host:port (port 0-65535), got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise Problem(f"an IPv6 host goes in brackets ([::1]:9464), got {value!r}")
    return address


def optional(check: Check) -> Check:
    """None (the setting left to its default behaviour), or what `check` accepts."""

    def maybe(value: Any) -> Any:
        return None if value is None else check(value)

    return maybe


def sizes(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)):
        raise Problem("must be a list of [height, width] pairs")
    side = whole(16, 16384)
    out = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise Problem(f"must be a list of [height, width] pairs, got {pair!r}")
        out.append((side(pair[0]), side(pair[1])))
    return tuple(out)


REQUIRED = dataclasses.MISSING


def setting(default: Any, check: Check, *, settable: bool = True) -> Any:
    """A settings field: its default and its check. `settable=False`: set by depthd, never by a file."""
    return field(default=default, metadata={"check": check, "settable": settable})


# --- the settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """One model to serve, and how: the pool and the engine read these fields, nothing copies them."""

    name: str = setting(REQUIRED, name)
    """What clients call it (EstimateRequest.model)."""
    source: str = setting(REQUIRED, text)
    """A hub id, or a folder with config.json, preprocessor_config.json and the weights."""
    device: str | None = setting(None, optional(device))
    """None: the daemon's `device`."""
    dtype: str | None = setting(None, optional(one_of(*DTYPES)))
    """None: the daemon's `dtype`."""
    backend: str | None = setting(None, optional(one_of(*BACKENDS)))
    """What runs the network (pre- and post-processing are depthd's, in torch, whatever runs it);
    None: the daemon's `backend`."""
    input_size: int | None = setting(None, optional(whole(14, 4096)))
    """The processed short side, rounded to the architecture's multiple: smaller is faster and
    coarser (docs/performance.md). None: the checkpoint's own (518 for Depth Anything)."""
    cache_dir: str | None = setting(None, optional(text))
    """None: the daemon's `cache_dir`."""
    warmup_sizes: tuple[tuple[int, int], ...] = setting(((480, 640),), sizes)
    """(height, width) of the frames to expect; each is run once before the model is ready."""
    max_batch: int | None = setting(None, optional(whole(1, 256)))
    """Most frames in one forward pass; None: 1 on CPU (a batch is no faster per frame there), 8 on CUDA."""
    max_wait_ms: float = setting(2.0, number(0, 1000))
    """Longest a frame waits for others to share its forward pass."""
    max_queue: int = setting(64, whole(1, 100_000))
    """Most frames waiting for this model; more are refused with RESOURCE_EXHAUSTED."""
    max_queue_bytes: int = setting(512 * MIB, whole(MIB, 2**48))
    """Bytes this model's frames may hold in the daemon: request bytes, decoded pixels and
    input tensors waiting, and replies not yet sent; more are refused with RESOURCE_EXHAUSTED."""
    max_processed_side: int | None = setting(None, optional(whole(32, 16384)))
    """Longest side a frame is processed at; larger ones are scaled down within it, keeping their
    aspect ratio. None: twice the checkpoint's own size (1036 for Depth Anything's 518)."""
    flip_augmentation: bool | None = setting(None, optional(flag))
    """Average with the mirrored frame's map; None: the architecture's default (ZoeDepth: on)."""
    attention: str | None = setting(None, optional(one_of("sdpa", "eager")))
    """None: transformers' default (SDPA where the architecture has it)."""
    channels_last: bool = setting(True, flag)
    """NHWC input and weights for the convolutions (measured faster on CPU: docs/performance.md)."""
    compile: bool = setting(False, flag)
    """torch.compile the forward pass (slow first calls; warm-up pays for the warm-up sizes)."""
    cuda_graphs: bool = setting(False, flag)
    """CUDA only: torch.compile with CUDA graphs for the warm-up sizes."""
    intrinsics: Intrinsics | None = setting(None, optional(intrinsics))
    """A fixed camera's {fx, fy, cx, cy}, in pixels of its images: for point clouds of requests
    that carry none."""
    demo: bool = setting(False, flag, settable=False)
    """Random weights: marked as such in ListModels and the log (set for the demo model only)."""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = setting(64 * MIB, whole(1024, MAX_MESSAGE_BYTES_CEILING))
    """Largest request accepted (a raw 4K RGB frame is 25 MB) and largest reply sent (map, points and
    visualization together, checked before any work); larger ones get RESOURCE_EXHAUSTED."""
    max_input_pixels: int = setting(40_000_000, whole(256, 10**9))
    """Largest frame, width x height, checked from the image header before decoding."""
    max_output_side: int = setting(8192, whole(16, 65535))
    """Largest width or height of a depth map, asked for or derived from the input's size."""
    stream_window: int = setting(4, whole(1, 256))
    """Frames of one stream accepted ahead of their responses; beyond it the stream is not read."""
    max_pending_bytes: int = setting(1024 * MIB, whole(MIB, 2**48))
    """Bytes all models' frames may hold in the daemon together (see ModelSettings.max_queue_bytes)."""
    transport_window_bytes: int = setting(64 * 1024, whole(16 * 1024, 64 * MIB))
    """HTTP/2 flow-control window of each stream, fixed: what a sender can push beyond the frames
    the daemon has accepted. gRPC would otherwise grow it (BDP probing) to megabytes."""
    max_concurrent_rpcs: int = setting(256, whole(1, 100_000))
    """Calls in progress at once, streams included; more get RESOURCE_EXHAUSTED."""
    max_connection_idle_s: float = setting(300.0, number(1, 86400))
    """A connection with no call for this long is closed (clients reconnect transparently)."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS for the TCP listeners (unix sockets stay plaintext, guarded by their file mode).
    The files are read again on SIGHUP, or when they change, for the next connections."""

    cert: str | None = setting(None, optional(readable_file))
    """The server's certificate chain (PEM)."""
    key: str | None = setting(None, optional(readable_file))
    """Its private key (PEM)."""
    client_ca: str | None = setting(None, optional(readable_file))
    """With it, clients must present a certificate signed by this CA (mutual TLS)."""

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class AuthSettings:
    token_file: str | None = setting(None, optional(readable_file))
    """Tokens, one per line, read again when the file changes. Every call but grpc.health.v1
    must carry the metadata `authorization: Bearer <token>` with one of them."""


SECTIONS = {"limits": Limits, "tls": TlsSettings, "auth": AuthSettings}
"""The settings that are mappings of their own; each key is `<section>.<name>` in messages."""


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    """host:port or unix:/path addresses."""
    models: tuple[ModelSettings, ...] = ()
    default_model: str | None = None
    """None: the first model."""
    device: str = setting("auto", device)
    dtype: str = setting("auto", one_of(*DTYPES))
    """auto: half precision where the hardware computes it natively (float16 on CUDA, bfloat16 on a
    CPU with AMX or AVX-512-BF16), else float32."""
    backend: str = setting("auto", one_of(*BACKENDS))
    """auto: the fastest installed backend for the device, by a measured rule (docs/performance.md)."""
    cache_dir: str | None = setting(None, optional(text))
    """Where exported and compiled networks are kept. None: $CACHE_DIRECTORY/compiled under systemd
    (/var/cache/depthd/compiled), else $XDG_CACHE_HOME/depthd or ~/.cache/depthd."""
    log_level: str = setting("info", one_of(*LOG_LEVELS))
    log_format: str = setting("text", one_of(*LOG_FORMATS))
    drain_grace_s: float = setting(10.0, number(0, 3600))
    """On SIGTERM, how long the frames received get to be answered."""
    decode_threads: int = setting(2, whole(1, 64))
    """Threads that decode and pre-process frames, and encode pictures, while the models run."""
    torch_threads: int = setting(0, whole(0, 1024))
    """Threads torch's CPU kernels use; 0: torch's default (one per core)."""
    demo: bool = setting(False, flag)
    """Also serve DEMO_MODEL, a tiny random-weight Depth Anything built at start-up (smoke tests)."""
    socket_group: str | None = setting(None, optional(group))
    """Group of the unix sockets, which are created 0660: its members may connect. None: the
    process's own group."""
    allow_insecure_remote: bool = setting(False, flag)
    """Accept listening on a non-loopback address with neither TLS nor a token (a warning at every start)."""
    metrics_listen: str | None = setting(None, metrics_address)
    """host:port of an HTTP endpoint serving Prometheus metrics at /metrics (no TLS, no token: keep
    it on loopback or a trusted network). None: no endpoint."""
    limits: Limits = field(default_factory=Limits)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name

    def with_demo_model(self, folder: str | Path) -> "Settings":
        """These settings with the demo model, built into `folder`, served after the others."""
        demo = ModelSettings(DEMO_MODEL, str(folder), warmup_sizes=((240, 320),), demo=True)
        return dataclasses.replace(self, models=self.models + (demo,))

    def resolved(self, model: ModelSettings) -> ModelSettings:
        """`model` with the daemon's device, dtype, backend and cache where it sets none of its own."""
        return dataclasses.replace(
            model, device=model.device or self.device, dtype=model.dtype or self.dtype,
            backend=model.backend or self.backend, cache_dir=model.cache_dir or self.cache_dir or default_cache_dir(),
        )


def default_cache_dir() -> str:
    """systemd's CacheDirectory= (it sets $CACHE_DIRECTORY), else the user's cache folder."""
    if os.environ.get("CACHE_DIRECTORY"):
        return str(Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "compiled")
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "depthd")


def _checked(cls: type) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if "check" in f.metadata]


def _settable(cls: type) -> set[str]:
    return {f.name for f in _checked(cls) if f.metadata["settable"]}


# --- sources: file, environment, flags -------------------------------------------------------

_ENV_SCALARS = {
    **{f"DEPTHD_{f.name.upper()}": f.name for f in _checked(Settings)},
    **{f"DEPTHD_{f.name.upper()}": f"limits.{f.name}" for f in _checked(Limits)},
    **{f"DEPTHD_{section.upper()}_{f.name.upper()}": f"{section}.{f.name}"
       for section in ("tls", "auth") for f in _checked(SECTIONS[section])},
    "DEPTHD_DEFAULT_MODEL": "default_model",
}


def model_from_argument(text: str) -> dict[str, str]:
    """`NAME=SOURCE`, or a bare SOURCE whose last path part, lower-cased, becomes the name."""
    name, sep, source = text.partition("=")
    if sep and NAME_PATTERN.match(name):
        return {"name": name, "source": source}
    source = text
    derived = re.sub(r"[^A-Za-z0-9._-]", "-", Path(source.rstrip("/")).name).lower().strip("-.") or "model"
    return {"name": derived[:64], "source": source}


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge file < environment < flags and validate. `flags` holds only what was given."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    layers = [(_read_yaml(Path(config_file)), str(config_file))] if config_file is not None else []
    layers += [(_from_environment(environ or {}), "environment"), (dict(flags or {}), "flags")]
    rank = {where: i for i, (_, where) in enumerate(layers)}
    for layer, where in layers:
        _merge(data, origin, layer, where)
    if "default_model" in origin and rank[origin["default_model"]] < rank.get(origin.get("models"), -1):
        # the models were replaced by a later layer: an earlier choice of default no longer applies
        del data["default_model"]
    for key in ("device", "dtype", "backend"):
        if origin.get(key) in ("environment", "flags"):
            # a device/dtype/backend given at start-up overrides every model's own
            for model in data.get("models", []):
                if isinstance(model, dict):
                    model.pop(key, None)
    return _validate(data, origin)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        content = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from error
    try:
        loaded = yaml.safe_load(content)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return loaded


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if environ.get("DEPTHD_LISTEN"):
        data["listen"] = [a.strip() for a in environ["DEPTHD_LISTEN"].split(",") if a.strip()]
    if environ.get("DEPTHD_MODELS"):
        data["models"] = [model_from_argument(m.strip()) for m in environ["DEPTHD_MODELS"].split(",") if m.strip()]
    for variable, key in _ENV_SCALARS.items():
        if environ.get(variable, "") != "":
            section, _, key_name = key.rpartition(".")
            (data.setdefault(section, {}) if section else data)[key_name] = environ[variable]
    return data


def _merge(data: dict, origin: dict, layer: Mapping[str, Any], where: str) -> None:
    for key, value in layer.items():
        if key in SECTIONS and isinstance(value, dict) and isinstance(data.get(key), dict):
            for sub, subvalue in value.items():
                data[key][sub] = subvalue
                origin[f"{key}.{sub}"] = where
            continue
        data[key] = value
        origin[key] = where
        if key in SECTIONS and isinstance(value, dict):
            origin.update({f"{key}.{sub}": where for sub in value})


# --- validation ------------------------------------------------------------------------------


class _Validator:
    def __init__(self, origin: dict[str, str]):
        self.origin = origin

    def fail(self, key: str, problem: str) -> ConfigError:
        top = key.split("[")[0].split(".")[0]
        where = self.origin.get(key) or self.origin.get(top)
        return ConfigError(f"{key}{f' (from {where})' if where else ''}: {problem}")

    def section(self, cls: type, given: Any, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """Every checked field of `cls` from `given`: its value, checked, or its default."""
        if not isinstance(given, dict):
            raise self.fail(prefix.rstrip(".") or "settings", "must be a mapping")
        allowed = _settable(cls) | set(skip)
        for key in given:
            if key not in allowed:
                raise self.fail(f"{prefix}{key}", f"unknown setting; known: {', '.join(sorted(allowed))}")
        values = {}
        for f in _checked(cls):
            if not f.metadata["settable"]:
                continue
            if f.name not in given and f.default is REQUIRED:
                raise self.fail(f"{prefix}{f.name}", "is required (a non-empty string)")
            try:
                values[f.name] = f.metadata["check"](given.get(f.name, f.default))
            except Problem as problem:
                raise self.fail(f"{prefix}{f.name}", str(problem)) from None
        return values


def _validate(data: dict[str, Any], origin: dict[str, str]) -> Settings:
    check = _Validator(origin)
    top = check.section(Settings, data, "", skip=("listen", "models", "default_model", *SECTIONS))
    listen = data.get("listen", list(Settings.listen))
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not listen:
        raise check.fail("listen", "must be a list of addresses (host:port or unix:/path)")
    listen = tuple(_address(check, f"listen[{i}]", a) for i, a in enumerate(listen))
    sections = {name: cls(**check.section(cls, data.get(name, {}), f"{name}.")) for name, cls in SECTIONS.items()}
    _check_tls(check, sections["tls"])
    models = _models(check, data.get("models", []), top["demo"])
    default_model = data.get("default_model")
    if default_model is not None and default_model not in {m.name for m in models}:
        raise check.fail("default_model", f"{default_model!r} is not among the models ({', '.join(m.name for m in models)})")
    settings = Settings(listen=listen, models=models, default_model=default_model, **sections, **top)
    _check_exposure(check, settings)
    return settings


def _check_tls(check: _Validator, tls: TlsSettings) -> None:
    if (tls.cert is None) != (tls.key is None):
        missing = "tls.key" if tls.key is None else "tls.cert"
        raise check.fail(missing, "TLS needs both tls.cert and tls.key (--tls-cert, --tls-key)")
    if tls.client_ca is not None and tls.cert is None:
        raise check.fail("tls.client_ca", "client certificates need TLS: set tls.cert and tls.key too")


def remote_addresses(settings: Settings) -> list[str]:
    """The TCP listen addresses other machines can reach (not loopback, not a unix socket)."""
    return [address for address in settings.listen if not address.startswith("unix:") and not _loopback(address)]


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other machines may resolve to this one


def _check_exposure(check: _Validator, settings: Settings) -> None:
    """Listening beyond loopback with neither TLS nor a token hands the API to anyone on the network."""
    if settings.tls.enabled or settings.auth.token_file or settings.allow_insecure_remote:
        return
    for index, address in enumerate(settings.listen):
        if address in remote_addresses(settings):
            raise check.fail(
                f"listen[{index}]",
                f"{address} can be reached from other machines, with neither TLS nor a token: set tls.cert and "
                "tls.key (--tls-cert, --tls-key) or auth.token_file (--auth-token-file); or, knowingly, "
                "allow_insecure_remote: true",
            )


def _address(check: _Validator, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise check.fail(key, f"must be host:port or unix:/path, got {value!r}")
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.lstrip("/") or not path.startswith("/"):
            raise check.fail(key, f"a unix socket needs an absolute path (unix:/run/depthd/depthd.sock), got {value!r}")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise check.fail(key, f"must be host:port (port 0-65535) or unix:/path, got {value!r}")
    return value


def _models(check: _Validator, given: Any, demo: bool) -> tuple[ModelSettings, ...]:
    if not isinstance(given, list) or (not given and not demo):
        raise check.fail("models", "at least one model is needed (--model NAME=SOURCE, or --demo)")
    models = []
    for i, entry in enumerate(given):
        if not isinstance(entry, dict):
            raise check.fail(f"models[{i}]", "must be a mapping with at least name and source")
        models.append(ModelSettings(**check.section(ModelSettings, entry, f"models[{i}].")))
    names = [m.name for m in models]
    if demo and DEMO_MODEL in names:
        raise check.fail("models", f"{DEMO_MODEL!r} is the demo model's name; give this model another")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise check.fail("models", f"names must be unique; repeated: {', '.join(duplicates)}")
    return tuple(models)
