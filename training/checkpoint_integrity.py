# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint integrity: what makes a checkpoint folder safe and complete to resume from, checked before anything in
it is loaded.

- **Manifest**: every save writes ``checkpoint_files.json`` last (`write_manifest`): the size and SHA-256 of every
  file; a checkpoint without it is incomplete.
- **No pickles**: accelerate's `load_state` would unpickle ``.pkl`` files, which can run code; this trainer never
  writes one (`check_no_pickles`).
- **Restricted loaders**: torch archives are read by the weights-only loader; DCP ``.metadata`` (FSDP's sharded state)
  by `_DcpMetadataUnpickler`, which resolves only checkpoint-metadata classes.

`verify_checkpoint` runs all of them (`training.train.resolve_resume` calls it).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import torch

PROGRESS_FILE = "training_state.json"  # the training state every checkpoint of this trainer holds
MANIFEST_FILE = "checkpoint_files.json"
PICKLE_SUFFIXES = (".pkl", ".pickle")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")  # torch.save archives, read back with torch.load(weights_only=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: a file is missing, corrupt or unsafe to load (the message names it)."""


def check_no_pickles(checkpoint: Path) -> None:
    """Refuse a checkpoint folder that holds a pickle: accelerate's `load_state` would unpickle it (its custom and RNG
    states are ``.pkl`` files), and unpickling can run any code. This trainer never writes one."""
    found = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} holds pickle files {found}: loading them could run code, and this trainer "
            "never writes them (the checkpoint comes from an older version or was tampered with). Resume from a "
            "checkpoint written by this version, or start a new run into a new output folder."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> Path:
    """Write ``checkpoint_files.json``: the size and SHA-256 of every file of ``checkpoint``."""
    files = {
        p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    path = checkpoint / MANIFEST_FILE
    path.write_text(json.dumps({"files": files}, indent=1) + "\n")
    return path


def _check_manifest(checkpoint: Path) -> None:
    path = checkpoint / MANIFEST_FILE
    try:
        files = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a valid list of checkpoint files ({error!r}).") from error
    for name, (size, digest) in expected.items():
        file = checkpoint / name
        if not file.is_file():
            raise CheckpointError(f"{str(file)!r} is missing (listed in {MANIFEST_FILE}).")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{str(file)!r} has {file.stat().st_size} bytes, {size} when it was saved (truncated or corrupt)."
            )
        if _sha256(file) != digest:
            raise CheckpointError(f"{str(file)!r} does not match the SHA-256 recorded when it was saved (corrupt).")


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Reads a ``torch.distributed.checkpoint`` ``.metadata`` file (FSDP's sharded state), resolving only what such a
    file names: its metadata classes, ``torch.Size``, dtypes, layouts and paths. DCP reads the file with `pickle.load`,
    which runs whatever a crafted file asks for; a file this unpickler reads back holds nothing else."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
    } | {(module, cls) for module in ("pathlib", "pathlib._local") for cls in ("PosixPath", "PurePosixPath")}

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as dcp_metadata

        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        allowed = (
            (module, name) in self.ALLOWED
            or (isinstance(found, type) and found.__module__ == module)  # a class defined there, not one imported
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not a checkpoint-metadata class")
        return super().find_class(module, name)


def _check_file(path: Path) -> None:
    """Read ``path`` the safe way its kind allows, raising `CheckpointError` naming it if it is corrupt or unsafe."""
    from accelerate.utils.other import load as accelerate_load
    from safetensors import SafetensorError, safe_open

    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:  # checks the header and that the data fills the file
                f.metadata()
        except (SafetensorError, OSError) as error:  # safetensors' own message names no file
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({error}).") from error
    elif path.suffix in TORCH_SUFFIXES:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{str(path)!r} is not a torch.save archive (truncated or corrupt).")
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()  # the CRC-32 of every record
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise CheckpointError(f"{str(path)!r} is not a readable torch.save archive ({error}).") from error
        if damaged is not None:
            raise CheckpointError(f"{str(path)!r} is corrupt: its record {damaged!r} fails its CRC check.")
        try:  # accelerate's loader: torch.load(weights_only=True) with the globals accelerate admits
            accelerate_load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{str(path)!r} was refused by torch's weights-only loader: it holds objects other than tensors and "
                f"plain containers, and unpickling it could run code ({error})."
            ) from error
        except (RuntimeError, OSError, EOFError) as error:
            raise CheckpointError(f"{str(path)!r} could not be read ({error}).") from error
    elif path.name.endswith(".metadata"):
        try:
            with open(path, "rb") as f:
                _DcpMetadataUnpickler(f).load()
        except Exception as error:  # any failure of the restricted unpickler: refuse rather than let DCP unpickle it
            raise CheckpointError(
                f"{str(path)!r} is not a checkpoint-metadata file that loads safely ({error}); "
                "torch.distributed.checkpoint would unpickle it without restriction."
            ) from error
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{str(path)!r} is not valid JSON ({error}).") from error


def verify_checkpoint(checkpoint: Path) -> None:
    """Check, before anything is loaded, that ``checkpoint`` can be resumed from safely.

    No pickle (`check_no_pickles`); the training state present; every file listed in ``checkpoint_files.json`` present
    with its saved size and SHA-256; every file of a kind resume reads well formed and safe: safetensors headers, torch
    archives (CRC-32s, and accepted by the weights-only loader), DCP ``.metadata`` (`_DcpMetadataUnpickler`), JSON;
    and the list itself present (a checkpoint without it is incomplete).

    Raises:
        CheckpointError: naming the first file that fails and why.
    """
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is not a folder.")
    check_no_pickles(checkpoint)
    if not (checkpoint / PROGRESS_FILE).is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no {PROGRESS_FILE}: not written by this trainer.")
    if (checkpoint / MANIFEST_FILE).exists():
        _check_manifest(checkpoint)
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        _check_file(path)
    if not (checkpoint / MANIFEST_FILE).exists():  # after the form checks, so that a malformed file is named first
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} has no {MANIFEST_FILE}, which every save writes last: the checkpoint is "
            "incomplete or was altered, and its files cannot be checked against what was saved. Resume from another "
            "checkpoint."
        )
