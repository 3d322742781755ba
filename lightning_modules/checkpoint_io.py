"""Checkpoints that survive a crash while being written."""

from __future__ import annotations

import os
import pickle
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename it over the target, so that a run killed mid-write keeps the
    previous checkpoint intact; a checkpoint that cannot be read raises an error naming the file.

    Remote paths (``s3://...``) are written as Lightning does by default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)  # atomic on POSIX file systems
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Weights only" in str(e):
                raise  # a readable file holding objects that weights-only loading refuses: not corruption
            raise RuntimeError(f"checkpoint {path} is corrupt or was only partly written ({e}); "
                               f"resume from an earlier checkpoint") from e
        except Exception as e:  # truncated or corrupt: say which file, keep the cause
            raise RuntimeError(f"checkpoint {path} is corrupt or was only partly written ({type(e).__name__}: {e}); "
                               f"resume from an earlier checkpoint") from e
