"""One typed settings object, from the YAML file, then `DEPTHD_*` environment, then flags.

Everything is validated on load; an error names the key, where its value came from
and what is allowed. Nothing here reads configuration at import time: `load_settings`
is handed the file, the environment and the flags explicitly.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


from depthd_client import MAX_MESSAGE_BYTES_CEILING

MIB = 1024 * 1024
DEFAULT_LISTEN = "127.0.0.1:50051"
DEMO_MODEL = "demo"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which and where from."""


@dataclass(frozen=True)
class ModelSettings:
    name: str
    source: str
    device: str | None = None
    """None: the daemon's `device`."""
    dtype: str | None = None
    """None: the daemon's `dtype`."""
    warmup_sizes: tuple[tuple[int, int], ...] = ((480, 640),)
    """(height, width) of the frames to expect; each is run once before the model is ready."""
    max_batch: int | None = None
    """Most frames in one forward pass; None: 1 on CPU (a batch is no faster per frame there), 8 on CUDA."""
    max_wait_ms: float = 2.0
    """Longest a frame waits for others to share its forward pass."""
    max_queue: int = 64
    """Most frames waiting for this model; more are refused with RESOURCE_EXHAUSTED."""
    max_queue_bytes: int = 512 * MIB
    """Bytes this model's frames may hold in the daemon: request bytes, decoded pixels and
    input tensors waiting, and replies not yet sent; more are refused with RESOURCE_EXHAUSTED."""
    max_processed_side: int | None = None
    """Longest side a frame is processed at; larger ones are scaled down within it, keeping their
    aspect ratio. None: twice the checkpoint's own size (1036 for Depth Anything's 518)."""
    flip_augmentation: bool | None = None
    """Average with the mirrored frame's map; None: the architecture's default (ZoeDepth: on)."""
    attention: str | None = None
    """"sdpa" or "eager"; None: transformers' default (SDPA where the architecture has it)."""
    channels_last: bool = True
    """NHWC input and weights for the convolutions (measured faster on CPU: docs/performance.md)."""
    compile: bool = False
    """torch.compile the forward pass (slow first calls; warm-up pays for the warm-up sizes)."""
    cuda_graphs: bool = False
    """CUDA only: torch.compile with CUDA graphs for the warm-up sizes."""
    demo: bool = False
    """Random weights: marked as such in ListModels and the log (set for the demo model only)."""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 64 * MIB
    """Largest request accepted (a raw 4K RGB frame is 25 MB) and largest reply sent (map, points and
    visualization together, checked before any work); larger ones get RESOURCE_EXHAUSTED."""
    max_input_pixels: int = 40_000_000
    """Largest frame, width x height, checked from the image header before decoding."""
    max_output_side: int = 8192
    """Largest width or height of a depth map, asked for or derived from the input's size."""
    stream_window: int = 4
    """Frames of one stream accepted ahead of their responses; beyond it the stream is not read."""
    max_pending_bytes: int = 1024 * MIB
    """Bytes all models' frames may hold in the daemon together (see ModelSettings.max_queue_bytes)."""
    transport_window_bytes: int = 64 * 1024
    """HTTP/2 flow-control window of each stream, fixed: what a sender can push beyond the frames
    the daemon has accepted. gRPC would otherwise grow it (BDP probing) to megabytes."""
    max_concurrent_rpcs: int = 256
    """Calls in progress at once, streams included; more get RESOURCE_EXHAUSTED."""
    max_connection_idle_s: float = 300.0
    """A connection with no call for this long is closed (clients reconnect transparently)."""


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    models: tuple[ModelSettings, ...] = ()
    default_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    log_level: str = "info"
    log_format: str = "text"
    drain_grace_s: float = 10.0
    decode_threads: int = 2
    """Threads that decode and pre-process frames while the models run."""
    torch_threads: int = 0
    """Threads torch's CPU kernels use; 0: torch's default (one per core)."""
    demo: bool = False
    """Also serve DEMO_MODEL, a tiny random-weight Depth Anything built at start-up (smoke tests)."""
    limits: Limits = field(default_factory=Limits)

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name

    def with_demo_model(self, folder: str | Path) -> "Settings":
        """These settings with the demo model, built into `folder`, served after the others."""
        demo = ModelSettings(DEMO_MODEL, str(folder), warmup_sizes=((240, 320),), demo=True)
        return dataclasses.replace(self, models=self.models + (demo,))

    def device_for(self, model: ModelSettings) -> str:
        return model.device or self.device

    def dtype_for(self, model: ModelSettings) -> str:
        return model.dtype or self.dtype


# --- sources: file, environment, flags -------------------------------------------------------

_ENV_SCALARS = {
    "DEPTHD_DEFAULT_MODEL": "default_model",
    "DEPTHD_DEVICE": "device",
    "DEPTHD_DTYPE": "dtype",
    "DEPTHD_LOG_LEVEL": "log_level",
    "DEPTHD_LOG_FORMAT": "log_format",
    "DEPTHD_DRAIN_GRACE_S": "drain_grace_s",
    "DEPTHD_DECODE_THREADS": "decode_threads",
    "DEPTHD_TORCH_THREADS": "torch_threads",
    "DEPTHD_DEMO": "demo",
    **{f"DEPTHD_{f.name.upper()}": f"limits.{f.name}" for f in fields(Limits)},
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
    for key in ("device", "dtype"):
        if origin.get(key) in ("environment", "flags"):
            # a device/dtype given at start-up overrides every model's own
            for model in data.get("models", []):
                if isinstance(model, dict):
                    model.pop(key, None)
    return _validate(data, origin)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from error
    try:
        loaded = yaml.safe_load(text)
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
            section, _, name = key.rpartition(".")
            (data.setdefault(section, {}) if section else data)[name] = environ[variable]
    return data


def _merge(data: dict, origin: dict, layer: Mapping[str, Any], where: str) -> None:
    for key, value in layer.items():
        if key == "limits" and isinstance(value, dict) and isinstance(data.get("limits"), dict):
            for sub, subvalue in value.items():
                data["limits"][sub] = subvalue
                origin[f"limits.{sub}"] = where
            continue
        data[key] = value
        origin[key] = where
        if key == "limits" and isinstance(value, dict):
            origin.update({f"limits.{sub}": where for sub in value})


# --- validation ------------------------------------------------------------------------------


class _Checker:
    def __init__(self, origin: dict[str, str]):
        self.origin = origin

    def fail(self, key: str, problem: str) -> ConfigError:
        top = key.split("[")[0].split(".")[0]
        where = self.origin.get(key) or self.origin.get(top)
        return ConfigError(f"{key}{f' (from {where})' if where else ''}: {problem}")

    def integer(self, key: str, value: Any, low: int, high: int) -> int:
        try:
            number = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not low <= number <= high:
            raise self.fail(key, f"must be a whole number from {low} to {high}, got {value!r}")
        return number

    def number(self, key: str, value: Any, low: float, high: float) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not low <= number <= high:
            raise self.fail(key, f"must be a number from {low:g} to {high:g}, got {value!r}")
        return number

    def boolean(self, key: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise self.fail(key, f"must be true or false, got {value!r}")

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        text = str(value).lower() if value is not None else None
        if text not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return text

    def device(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
            raise self.fail(key, f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    def known_keys(self, key_prefix: str, given: dict, allowed: set[str]) -> None:
        for key in given:
            if key not in allowed:
                raise self.fail(f"{key_prefix}{key}", f"unknown setting; known: {', '.join(sorted(allowed))}")


def _validate(data: dict[str, Any], origin: dict[str, str]) -> Settings:
    check = _Checker(origin)
    top_keys = {f.name for f in fields(Settings)}
    check.known_keys("", data, top_keys)
    defaults = Settings()
    listen = data.get("listen", list(defaults.listen))
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not listen:
        raise check.fail("listen", "must be a list of addresses (host:port or unix:/path)")
    listen = tuple(_address(check, f"listen[{i}]", a) for i, a in enumerate(listen))
    limits = _limits(check, data.get("limits", {}))
    demo = check.boolean("demo", data.get("demo", False))
    models = _models(check, data.get("models", []), demo)
    default_model = data.get("default_model")
    if default_model is not None and default_model not in {m.name for m in models}:
        raise check.fail("default_model", f"{default_model!r} is not among the models ({', '.join(m.name for m in models)})")
    return Settings(
        listen=listen,
        models=models,
        default_model=default_model,
        device=check.device("device", data.get("device", defaults.device)),
        dtype=check.choice("dtype", data.get("dtype", defaults.dtype), DTYPES),
        log_level=check.choice("log_level", data.get("log_level", defaults.log_level), LOG_LEVELS),
        log_format=check.choice("log_format", data.get("log_format", defaults.log_format), LOG_FORMATS),
        drain_grace_s=check.number("drain_grace_s", data.get("drain_grace_s", defaults.drain_grace_s), 0, 3600),
        decode_threads=check.integer("decode_threads", data.get("decode_threads", defaults.decode_threads), 1, 64),
        torch_threads=check.integer("torch_threads", data.get("torch_threads", defaults.torch_threads), 0, 1024),
        demo=demo,
        limits=limits,
    )


def _address(check: _Checker, key: str, value: Any) -> str:
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


def _limits(check: _Checker, given: Any) -> Limits:
    if not isinstance(given, dict):
        raise check.fail("limits", "must be a mapping")
    check.known_keys("limits.", given, {f.name for f in fields(Limits)})
    d = Limits()
    return Limits(
        max_message_bytes=check.integer(
            "limits.max_message_bytes", given.get("max_message_bytes", d.max_message_bytes), 1024, MAX_MESSAGE_BYTES_CEILING
        ),
        max_input_pixels=check.integer("limits.max_input_pixels", given.get("max_input_pixels", d.max_input_pixels), 256, 10**9),
        max_output_side=check.integer("limits.max_output_side", given.get("max_output_side", d.max_output_side), 16, 65535),
        stream_window=check.integer("limits.stream_window", given.get("stream_window", d.stream_window), 1, 256),
        max_pending_bytes=check.integer(
            "limits.max_pending_bytes", given.get("max_pending_bytes", d.max_pending_bytes), MIB, 2**48
        ),
        transport_window_bytes=check.integer(
            "limits.transport_window_bytes", given.get("transport_window_bytes", d.transport_window_bytes),
            16 * 1024, 64 * MIB,
        ),
        max_concurrent_rpcs=check.integer(
            "limits.max_concurrent_rpcs", given.get("max_concurrent_rpcs", d.max_concurrent_rpcs), 1, 100_000
        ),
        max_connection_idle_s=check.number(
            "limits.max_connection_idle_s", given.get("max_connection_idle_s", d.max_connection_idle_s), 1, 86400
        ),
    )


def _models(check: _Checker, given: Any, demo: bool) -> tuple[ModelSettings, ...]:
    if not isinstance(given, list) or (not given and not demo):
        raise check.fail("models", "at least one model is needed (--model NAME=SOURCE, or --demo)")
    allowed = {f.name for f in fields(ModelSettings)} - {"demo"}
    models = []
    for i, entry in enumerate(given):
        key = f"models[{i}]"
        if not isinstance(entry, dict):
            raise check.fail(key, "must be a mapping with at least name and source")
        check.known_keys(f"{key}.", entry, allowed)
        for required in ("name", "source"):
            if not entry.get(required) or not isinstance(entry[required], str):
                raise check.fail(f"{key}.{required}", "is required (a non-empty string)")
        if not NAME_PATTERN.match(entry["name"]):
            raise check.fail(f"{key}.name", f"must be 1-64 of letters, digits, '.', '_', '-', got {entry['name']!r}")
        d = ModelSettings(entry["name"], entry["source"])
        flip = entry.get("flip_augmentation")
        models.append(
            ModelSettings(
                name=entry["name"],
                source=entry["source"],
                device=None if entry.get("device") is None else check.device(f"{key}.device", entry["device"]),
                dtype=None if entry.get("dtype") is None else check.choice(f"{key}.dtype", entry["dtype"], DTYPES),
                warmup_sizes=_sizes(check, f"{key}.warmup_sizes", entry.get("warmup_sizes", d.warmup_sizes)),
                max_batch=None if entry.get("max_batch") is None else check.integer(
                    f"{key}.max_batch", entry["max_batch"], 1, 256
                ),
                max_wait_ms=check.number(f"{key}.max_wait_ms", entry.get("max_wait_ms", d.max_wait_ms), 0, 1000),
                max_queue=check.integer(f"{key}.max_queue", entry.get("max_queue", d.max_queue), 1, 100_000),
                max_queue_bytes=check.integer(
                    f"{key}.max_queue_bytes", entry.get("max_queue_bytes", d.max_queue_bytes), MIB, 2**48
                ),
                max_processed_side=None if entry.get("max_processed_side") is None else check.integer(
                    f"{key}.max_processed_side", entry["max_processed_side"], 32, 16384
                ),
                flip_augmentation=None if flip is None else check.boolean(f"{key}.flip_augmentation", flip),
                attention=None if entry.get("attention") is None else check.choice(
                    f"{key}.attention", entry["attention"], ("sdpa", "eager")
                ),
                channels_last=check.boolean(f"{key}.channels_last", entry.get("channels_last", d.channels_last)),
                compile=check.boolean(f"{key}.compile", entry.get("compile", False)),
                cuda_graphs=check.boolean(f"{key}.cuda_graphs", entry.get("cuda_graphs", False)),
            )
        )
    names = [m.name for m in models]
    if demo and DEMO_MODEL in names:
        raise check.fail("models", f"{DEMO_MODEL!r} is the demo model's name; give this model another")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise check.fail("models", f"names must be unique; repeated: {', '.join(duplicates)}")
    return tuple(models)


def _sizes(check: _Checker, key: str, value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)):
        raise check.fail(key, "must be a list of [height, width] pairs")
    sizes = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise check.fail(f"{key}[{i}]", f"must be [height, width], got {pair!r}")
        sizes.append((check.integer(f"{key}[{i}][0]", pair[0], 16, 16384), check.integer(f"{key}[{i}][1]", pair[1], 16, 16384)))
    return tuple(sizes)
