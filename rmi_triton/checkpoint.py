"""Checkpoints: the network's state and build config, written atomically, read safely.

A checkpoint is a plain dict saved with `torch.save` and read back with
`torch.load(weights_only=True)`, so a file can never make Python run code:

    {"format": "rmi_triton.checkpoint", "version": 1,
     "model": {name: tensor},            # the segmentation network's state_dict
     "config": {"name": str, "num_classes": int, "backbone": str, "output_stride": int,
                "aux_head": bool},       # `build_model`'s arguments; aux_head optional (False)
     ...}                                # optional training state (tensors, numbers, strings)

No loss state is stored: the RMI loss has no parameters, and the network alone
is what inference (and export) needs. `build_from_checkpoint` rebuilds it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch

from .files import atomic_writer, load_refusal

FORMAT = "rmi_triton.checkpoint"
VERSION = 1
# The config keys every checkpoint holds, and the optional ones with the value a checkpoint
# without them was built with (aux_head was not recorded at first).
CONFIG_KEYS = ("name", "num_classes", "backbone", "output_stride")
CONFIG_DEFAULTS: Dict[str, Any] = {"aux_head": False}
# The config values `build_model` takes, each with the exact types it may have (exact:
# bool is an int subclass, so isinstance would let True pass as num_classes 1); bn_eps and
# bn_momentum only where a network's BatchNorm settings are not the defaults. "norm_layer"
# describes norm layers no config can rebuild (`build_model`'s build_config).
CONFIG_TYPES: Dict[str, Tuple[type, ...]] = {
    "name": (str,), "num_classes": (int,), "backbone": (str,), "output_stride": (int,), "aux_head": (bool,),
    "bn_eps": (float,), "bn_momentum": (float, type(None)), "norm_layer": (str,)}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, foreign or unsafe."""


def _config_problem(config: Any) -> Optional[str]:
    """Why ``config`` cannot be a checkpoint's model config, or None when it can.

    Checks presence and type of each key (`CONFIG_KEYS`, `CONFIG_TYPES`); whether
    the values name a network that exists is `build_model`'s to say.
    """
    if not isinstance(config, dict):
        return f"the model config is a {type(config).__name__}, not a dict with {list(CONFIG_KEYS)}"
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        return f"the model config lacks {missing}; needs {list(CONFIG_KEYS)}"
    for key, kinds in CONFIG_TYPES.items():
        if key in config and type(config[key]) not in kinds:
            return (f"model config {key!r} must be of type {' or '.join(k.__name__ for k in kinds)}, "
                    f"got {type(config[key]).__name__} {config[key]!r}")
    return None


def save_checkpoint(path: str | os.PathLike, model_state: Dict[str, torch.Tensor], config: Dict[str, Any],
                    **extra: Any) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one,
    never a half-written checkpoint.

    Raises:
        ValueError: ``config`` lacks a key of `CONFIG_KEYS` or holds a value of
            the wrong type (see `_config_problem`), ``model_state`` is not a dict
            of tensors, or it is a DistributedDataParallel / torch.compile wrapper's
            (its names prefixed; `build_from_checkpoint` could not load it); nothing
            is written.
    """
    problem = _config_problem(config)
    if problem:
        raise ValueError(f"cannot save checkpoint {os.fspath(path)!r}: {problem}")
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        raise ValueError(f"cannot save checkpoint {os.fspath(path)!r}: the model state must be a dict of "
                         "tensors (a state_dict()), which load_checkpoint requires")
    wrapper = _wrapper_prefix(model_state)
    if wrapper:
        raise ValueError(f"cannot save checkpoint {os.fspath(path)!r}: {wrapper}")
    payload = {"format": FORMAT, "version": VERSION, "model": model_state, "config": dict(config), **extra}
    with atomic_writer(path) as f:
        torch.save(payload, f)


def _wrapper_prefix(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a state dict whose every key carries a wrapper's prefix, or None:
    DistributedDataParallel (or DataParallel) names its network `module.`, torch.compile
    `_orig_mod.`, and the two nest."""
    wrappers = {"module.": "DistributedDataParallel (or DataParallel)", "_orig_mod.": "torch.compile"}
    names, chain = [str(k) for k in state], []
    while names:
        prefix = next((p for p in wrappers if all(n.startswith(p) for n in names)), None)
        if prefix is None:
            break
        chain.append(prefix)
        names = [n[len(prefix):] for n in names]
    if not chain:
        return None
    unwrapped = "model" + "".join("." + p.rstrip(".") for p in chain)
    return (f"its weights are a {' + '.join(wrappers[p] for p in chain)} wrapper's (every name starts with "
            f"{''.join(chain)!r}); save the network's own, {unwrapped}.state_dict()")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Dict[str, Any]:
    """Read and check a checkpoint; never executes anything the file contains.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: a corrupt, truncated or foreign file, one holding pickled
            objects, a model config with a key missing or of the wrong type (the
            message names the key and the type expected), no state dict of tensors,
            or non-finite weights (the message names them).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} is a folder, not a checkpoint file (a training run "
                                "keeps its checkpoint in its --out folder as last.pt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory sits at the end
        if path.lower().endswith(".onnx"):
            raise CheckpointError(f"{path!r} is an ONNX model, not a checkpoint (the exporter reads a training "
                                  "checkpoint; verify_onnx and compare_exports take ONNX models)")
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated (not a complete torch.save archive)")
    damaged = _damaged_entry(path)  # torch.load reads the entries without their checksums
    if damaged:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {damaged}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path!r} holds objects other than tensors and plain containers and was "
            f"refused without running it: {load_refusal(err)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        if "CUDA" in str(err) and not torch.cuda.is_available():
            raise CheckpointError(f"checkpoint {path!r}: map_location={map_location!r} asks for a CUDA device, "
                                  "and none is available (map_location='cpu' reads it)") from None
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated: {load_refusal(err)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an rmi_triton checkpoint (no format={FORMAT!r} entry)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {payload.get('version')}, expected {VERSION}")
    config, state = payload.get("config"), payload.get("model")
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"checkpoint {path!r} has no usable model config: {problem}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path!r} has no model state dict of tensors")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"checkpoint {path!r} holds non-finite (NaN or Inf) weights in "
                              f"{', '.join(nonfinite[:5])}{' ...' if len(nonfinite) > 5 else ''}")
    return payload


def _damaged_entry(path: str) -> Optional[str]:
    """What of a torch.save archive fails its CRC-32 (bytes changed after it was written: a
    disk's or a copy's fault), or None. torch.load does not check them, so a damaged tensor
    loaded as if intact. (0.09 s for the 235 MB of a DeepLabv3 ResNet-101 on a 2-core CPU
    machine, whose load takes 1 s.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            name = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"its archive cannot be read ({type(err).__name__}: {err})"
    return None if name is None else f"its entry {name} fails its checksum (changed after it was written)"


def build_from_checkpoint(path_or_payload, map_location="cpu") -> torch.nn.Module:
    """The segmentation network a checkpoint describes, with its weights loaded (eval mode).

    ``path_or_payload`` is a checkpoint file or what `load_checkpoint` returned.
    A config without ``aux_head`` (older checkpoints) builds the network without
    the auxiliary head; with ``aux_head=True`` the head is built and loaded too,
    though eval mode (inference, export) never runs it.

    Raises:
        CheckpointError: the file is not a usable checkpoint (see `load_checkpoint`),
            its config names no network `build_model` can build, or the weights do
            not fit that network.
    """
    from rmi_triton.models import build_model

    payload = path_or_payload if isinstance(path_or_payload, dict) else load_checkpoint(path_or_payload,
                                                                                       map_location)
    problem = _config_problem(payload.get("config")) if isinstance(payload, dict) else "not a checkpoint dict"
    if problem:
        raise CheckpointError(f"checkpoint has no usable model config: {problem}")
    config = payload["config"]
    if "norm_layer" in config:
        raise CheckpointError(
            f"checkpoint's network was built with norm_layer {config['norm_layer']}, which a checkpoint cannot "
            "rebuild (it holds no code): build it with build_model(..., norm_layer=<the same>) and load the "
            "checkpoint's 'model' state dict into it")
    arguments = dict(CONFIG_DEFAULTS, **{k: config[k] for k in CONFIG_TYPES if k in config})
    try:
        model = build_model(**arguments)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint describes a network that cannot be built: {err}") from None
    state = payload.get("model")
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint has no model state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # mis-shaped tensors
        raise CheckpointError(f"checkpoint weights do not fit {config['name']}/{config['backbone']}: "
                              f"{str(err).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        wrapper = _wrapper_prefix(state)
        if wrapper:
            raise CheckpointError(f"checkpoint weights do not fit {config['name']}/{config['backbone']}: {wrapper}")
        raise CheckpointError(f"checkpoint weights do not fit {config['name']}/{config['backbone']}: "
                              f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
