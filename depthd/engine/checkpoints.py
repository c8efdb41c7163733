"""Load a depth checkpoint (hub id or local folder) with its processor config, or say why not.

Loading goes through transformers' own `from_pretrained`, so a hub id, a folder and the
offline cache (`HF_HUB_OFFLINE=1`, `HF_HOME`) all behave as transformers documents.
Every failure becomes one `ModelLoadError` naming the model and the cause, never a
traceback: a missing or corrupt file, an unknown architecture, a checkpoint whose
weights do not cover its model (which would run with random layers).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthd.config import ModelSettings
from depthd.engine.pixels import approximation
from depthd.engine.plan import ProcessorConfig
from depthd.engine.recipes import ARCHITECTURES, Architecture, Recipe, supported_names
from depthd.errors import ModelLoadError, UnsupportedArchitecture

logger = logging.getLogger(__name__)

OFFLINE_HINT = (
    "depthd cannot reach a model hub from here: give a local folder holding config.json, "
    "preprocessor_config.json and the weights, or set HF_HUB_OFFLINE=1 with the model "
    "already in the Hugging Face cache (HF_HOME)"
)


@dataclass
class Checkpoint:
    """A loaded model, in eval mode on its device, and what is needed to feed and read it."""

    name: str
    source: str
    architecture: Architecture
    model: Any
    config: Any
    recipe: Recipe


def load_checkpoint(settings: ModelSettings, device: Any, dtype: Any, weights: bool = True) -> Checkpoint:
    """Load the model `settings` name onto `device` in `dtype`; raises ModelLoadError with the cause.
    Without `weights`, only its configs: for a backend that runs an exported network.

    `settings.attention` ("sdpa" or "eager") applies to the model and every sub-model (a
    backbone) whose class offers the choice; None keeps transformers' default.
    """
    from transformers import AutoConfig

    name, source = settings.name, settings.source
    local = _local_folder(name, source)
    options = {"local_files_only": True} if local else {}
    config = _guarded(name, source, "config.json", lambda: AutoConfig.from_pretrained(source, **options))
    architecture = _architecture(name, source, config)
    recipe = _recipe(settings, architecture, options)
    if not weights:
        return Checkpoint(name, source, architecture, None, config, recipe)
    if settings.attention is not None:
        options = {**options, "attn_implementation": _attention_per_config(config, settings.attention)}
    model = _model(name, source, config, architecture, dtype, options)
    model.to(device).eval()
    logger.info(
        "loaded model=%s source=%s architecture=%s parameters=%d device=%s dtype=%s",
        name, source, architecture.model_type, sum(p.numel() for p in model.parameters()), device,
        str(dtype).removeprefix("torch."),
    )
    return Checkpoint(name, source, architecture, model, config, recipe)


def _attention_per_config(config: Any, attention: str) -> dict[str, str]:
    """transformers refuses SDPA for a whole model when a part of it lacks it (Depth Anything's
    head, DPT-hybrid's BiT backbone): ask for it on each part whose class supports it."""
    from transformers import AutoBackbone, AutoModelForDepthEstimation

    def offers(mapping, part_config) -> bool:
        return attention == "eager" or getattr(mapping._model_mapping.get(type(part_config), None), "_supports_sdpa", False)

    choice = {
        key: attention
        for key in getattr(config, "sub_configs", {})
        if getattr(config, key, None) is not None and offers(AutoBackbone, getattr(config, key))
    }
    if offers(AutoModelForDepthEstimation, config):
        choice[""] = attention
    return choice


def _local_folder(name: str, source: str) -> bool:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(name, source, "the folder has no config.json")
        return True
    if source.startswith(("/", ".", "~")) or os.sep + os.sep in source:
        raise ModelLoadError(name, source, "no such folder")
    return False


def _architecture(name: str, source: str, config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    architecture = ARCHITECTURES.get(model_type)
    if architecture is None:
        raise UnsupportedArchitecture(
            name, source, f"architecture {model_type!r} is not supported; supported: {supported_names()}"
        )
    named = getattr(config, "architectures", None) or []
    foreign = [c for c in named if c not in architecture.classes]
    if foreign:
        raise UnsupportedArchitecture(
            name, source,
            f"the checkpoint is a {foreign[0]}, not a depth-estimation model "
            f"(expected {' or '.join(architecture.classes)})",
        )
    return architecture


def _recipe(settings: ModelSettings, architecture: Architecture, options: dict) -> Recipe:
    from transformers.image_processing_base import ImageProcessingMixin

    name, source = settings.name, settings.source
    saved, _ = _guarded(
        name, source, "preprocessor_config.json",
        lambda: ImageProcessingMixin.get_image_processor_dict(source, **options),
    )
    config = ProcessorConfig.from_saved(saved, architecture.processor_defaults)
    try:
        if settings.input_size is not None:
            config = _with_input_size(config, architecture, settings.input_size)
        recipe = architecture.recipe(config, settings.max_processed_side)
    except ValueError as problem:
        raise ModelLoadError(name, source, f"preprocessor_config.json: {problem}") from None
    approximate = approximation(config)
    if approximate:
        logger.warning("model=%s resize is approximate: %s", name, approximate)
    return recipe


def _with_input_size(config: ProcessorConfig, architecture: Architecture, short_side: int) -> ProcessorConfig:
    if not architecture.resizable or not config.do_resize or config.size is None:
        raise ValueError(f"input_size: {architecture.label} {architecture.fixed_size_reason}; leave input_size unset")
    return config.with_short_side(short_side)


def checkpoint_files(source: str) -> list[Path]:
    """The files of the checkpoint `source` names: a local folder's, or its snapshot's in the Hugging Face cache."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
        if not isinstance(found, str):
            return []
        folder = Path(found).parent
    return [path for path in folder.iterdir() if path.is_file()]


def _model(name: str, source: str, config: Any, architecture: Architecture, dtype: Any, options: dict) -> Any:
    from transformers import AutoModelForDepthEstimation

    model, info = _guarded(
        name, source, "weights",
        lambda: AutoModelForDepthEstimation.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True, **options
        ),
    )
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        first = (missing or [str(m) for m in mismatched])[0]
        raise ModelLoadError(
            name, source,
            f"the weights do not match the config ({architecture.label}): {len(missing)} missing and "
            f"{len(mismatched)} mis-shaped tensors (first: {first}); it would run with random layers",
        )
    return model


def _guarded(name: str, source: str, what: str, load):
    """Run a transformers load step, turning its many exception types into one clear cause."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as error:  # transformers raises OSError, ValueError, SafetensorError, ...
        # safetensors reports a file it may not read as "No such file or directory": look first
        denied = _unreadable(source)
        cause = _permission_cause(*denied) if denied else _cause(what, error)
        raise ModelLoadError(name, source, cause) from error


def _model_files(source: str) -> tuple[Path | None, list[Path]]:
    """The folder holding a model's files (a local folder, or its entry in the Hugging Face cache)
    and the files in it."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import constants

        folder = Path(constants.HF_HUB_CACHE) / ("models--" + source.replace("/", "--"))
    if not folder.is_dir():
        return None, []
    return folder, [path for path in folder.rglob("*") if not path.is_dir()]


def _unreadable(source: str) -> tuple[Path, Path] | None:
    """(the model's folder, the first of its files this process may not read), or None."""
    folder, files = _model_files(source)
    for path in files:
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            return folder, path
        except OSError:
            continue
    return None


def _permission_cause(folder: Path, path: Path) -> str:
    info = path.stat() if not path.is_symlink() else path.resolve().stat()
    return (
        f"permission denied reading {path} (owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}): this user "
        f"(uid {os.geteuid()}) cannot read the model's files. Make them readable: sudo chmod -R a+rX {folder} "
        "(files copied into the service's cache after its first start keep their owner and mode)"
    )


def _cause(what: str, error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lowered = text.lower()
    if "couldn't connect" in lowered or "offline" in lowered or "repo id must be" in lowered or (
        "can't load" in lowered and "huggingface.co" in lowered and what != "preprocessor_config.json"
    ):
        return f"not found locally and not in the cache ({what}). {OFFLINE_HINT}"
    if what == "preprocessor_config.json" and "preprocessor_config.json" in lowered:
        return "no preprocessor_config.json: without it the model's resize and normalisation are unknown"
    if type(error).__name__ == "SafetensorError" or "deserializ" in lowered:
        return f"the weights file is corrupt or truncated ({text})"
    if "ignore_mismatched_sizes" in lowered:
        return "the weights do not match the config: some tensors have other shapes (weights of another model?)"
    if "no file named" in lowered:
        return "no weights file (model.safetensors or pytorch_model.bin)"
    if "does not recognize this architecture" in lowered or "unrecognized model" in lowered:
        return f"{text.split('.')[0]}; supported: {supported_names()}"
    return f"{what}: {text}"
