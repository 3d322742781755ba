"""Reading and writing ``.ckpt`` files: safe loading by default, and writes that survive a crash.

A ``.ckpt`` is a pickle, and unpickling can run any code the file names. ``load_checkpoint`` therefore reads
it with ``torch.load(weights_only=True)``, which builds only tensors, plain containers and the few classes
allow-listed here (what the project's own checkpoints contain); anything else is refused before it runs.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .decoder import DecoderConfig
from .vision import VisionConfig

# What the project's checkpoints pickle beyond torch's own weights-only set (tensors, storages, containers,
# numbers, strings): the config dataclasses that ``LitNXTP`` keeps as hyperparameters when it is built from
# Python (``nxtp fit`` stores them as dicts). Optimizer, scheduler, callback and RNG states are plain data.
SAFE_GLOBALS: list[type] = [VisionConfig, DecoderConfig]

TRUST_HINT = (
    "If you trust this file (you wrote it, or know who did), load it on purpose with "
    "`--trust-checkpoint` (nxtp label / nxtp export), `trust=True` (Recognizer.from_checkpoint, "
    "load_checkpoint) or `weights_only=False` (Trainer.fit)"
)


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint that names Python objects outside the allow-list; nothing in it was run."""


def _open(path: str | Path):
    if "://" in str(path):  # s3://, gs://, ...: through fsspec, as Lightning reads them
        import fsspec

        return fsspec.open(str(path), "rb").open()
    return open(path, "rb")


def load_checkpoint(
    path: str | Path, trust: bool = False, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read a ``.ckpt`` without running code from it, unless ``trust`` is set.

    Args:
        path: the checkpoint file (a local path or an fsspec URL).
        trust: unpickle anything the file names (``weights_only=False``); only for files you trust.
        map_location: as for ``torch.load``.
        mmap: map a local file's tensors instead of reading them (cheap when only a few entries are needed).

    Raises:
        UntrustedCheckpointError: the file names globals outside ``SAFE_GLOBALS`` and torch's weights-only
            set; the message lists them and says how to trust the file.
    """
    if trust:
        with _open(path) as f:
            return torch.load(f, map_location=map_location, weights_only=False)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            if mmap and "://" not in str(path):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            with _open(path) as f:
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            try:  # every offending global, read from the pickle without running it
                with _open(path) as f:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
            except Exception:  # e.g. the legacy (non-zip) format: the first one, from torch's message
                names = re.findall(r"GLOBAL (\S+) was not an allowed global", str(e))
            if not names:
                raise  # not a refusal: a corrupt file, for the caller to report
            raise UntrustedCheckpointError(
                f"refusing to load checkpoint {path}: it pickles {', '.join(names)} outside the "
                f"allow-list of what this project's checkpoints contain, and unpickling them could run code. "
                f"{TRUST_HINT}."
            ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write once to a temporary file next to the target, fsync it and rename it over the target, so that a run
    killed mid-write (or a power cut after the rename) keeps the previous checkpoint intact; read through
    ``load_checkpoint`` (safe unless ``weights_only=False``), and a checkpoint that cannot be read raises an error
    naming the file.

    Remote paths (``s3://...``) are written as Lightning does by default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path``: atomically and durably for a local path, as Lightning for a URL."""
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:  # as TorchCheckpointIO: a local file takes none
            raise TypeError(f"`storage_options` is not supported for local paths by `{type(self).__name__}`")
        # Not Lightning's writer: it serialises into memory, stages the bytes in $TMPDIR (a second full write, a
        # copy when /tmp is another file system) and renames without fsync, so a crash can leave an empty target.
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # Same folder, so the rename is atomic; O_EXCL never clobbers; mode 0o666 lets the umask decide, as a
        # plain open() does (mkstemp would make every checkpoint 0o600).
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)  # atomic on POSIX file systems
        except BaseException:  # KeyboardInterrupt included: never leave a partial temporary file behind
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        _fsync_directory(folder)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning passes None unless the user chose: only an explicit weights_only=False trusts the file.
        try:
            return load_checkpoint(
                path, trust=weights_only is False, map_location=map_location or (lambda storage, loc: storage)
            )
        except (FileNotFoundError, UntrustedCheckpointError):
            raise
        except Exception as e:  # truncated or corrupt: say which file, keep the cause
            raise RuntimeError(
                f"checkpoint {path} is corrupt or was only partly written ({type(e).__name__}: {e}); "
                f"resume from an earlier checkpoint"
            ) from e


def _fsync_directory(folder: str) -> None:
    """Make a rename in ``folder`` durable; a no-op where directories cannot be opened or synced."""
    if os.name != "posix":  # Windows cannot open a directory as a file
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (e.g. some network mounts) refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
