"""What a saved model is: the one module that knows the keys of a ``.ckpt`` and the files of a model folder.

Two forms hold a model:
- a **model folder** (``nxtp export --format safetensors``, ``nxtp import-official``, ``NXTP.save_pretrained``):
  ``config.yaml`` (``NXTPConfig``), ``model.safetensors`` and ``tokenizer/``; no pickle anywhere;
- a Lightning **``.ckpt``** written by ``nxtp fit``: the weights under ``state_dict`` (``model.*``), the model's
  config (``CONFIG_KEY``, and the hyper-parameters ``LitNXTP`` was built with), a copy of the tokenizer's files
  (``TOKENIZER_KEY``) and what resuming the run needs (``TrainingState``). It is read without running code from its
  pickle (``checkpoint_io.load_checkpoint``) unless the caller trusts it.

Either may hold a label calibration (``nxtp calibrate``): ``CALIBRATION_FILE`` in a folder, ``CALIBRATION_KEY`` in a
``.ckpt``, JSON naming the weights it was fitted on (``model_identity``); ``load_model`` attaches it to the model as
``model.calibration`` (None without one) and refuses one fitted on other weights.

Everything else (``Recognizer``, the CLI, ``nxtp serve``, export, resume) goes through the functions here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import yaml
from torch import Tensor, nn

from .calibration import Calibration, CalibrationError
from .checkpoint_io import AtomicCheckpointIO, load_checkpoint
from .nxtp import NXTP, NXTPConfig

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CALIBRATION_FILE = "calibration.json"  # ``calibration.Calibration.to_json()``, beside the weights it was fitted on

CONFIG_KEY = "nxtp_config"  # NXTPConfig.to_dict(): plain data, whatever LitNXTP's arguments are called
TOKENIZER_KEY = "nxtp_tokenizer_files"
RNG_KEY = "nxtp_rng_states"
MAX_STEPS_KEY = "nxtp_max_steps"
TRAIN_SKIPPED_KEY = "nxtp_train_skipped"
CALIBRATION_KEY = "nxtp_calibration"  # the same JSON text as CALIBRATION_FILE (a plain string: no pickle risk)
MODEL_PREFIX = "model."  # LitNXTP keeps the recognizer as ``self.model``

# Before NXTPConfig, LitNXTP took the architecture as top-level arguments: checkpoints of that time keep these
# keys at the top of their hyper-parameters (and no CONFIG_KEY).
_FLAT_KEYS = ("vision", "decoder", "tokenizer", "prompt", "reference_compat", "reset_label_positions")


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir()


# model folders ----------------------------------------------------------------------------------------------


def save_folder(model: NXTP, out_dir: str | Path) -> Path:
    """Write ``model`` as a model folder (``config.yaml``, ``model.safetensors``, ``tokenizer/``); return it."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["vision"] = {**config["vision"], "pretrained": None}  # the weights are in model.safetensors
    layers = model.decoder.config
    config["decoder"] = {
        "name_or_path": None,
        "num_blocks": None,
        "dtype": "float32",
        "config": {"model_type": layers.model_type, **layers.to_diff_dict()},
    }
    config["tokenizer"] = TOKENIZER_DIR
    model.tokenizer.save_pretrained(out / TOKENIZER_DIR)
    safetensors.torch.save_model(model, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    calibration = getattr(model, "calibration", None)
    if calibration is not None and calibration.model_id == model_identity(model):  # not after the weights changed
        write_calibration(out, calibration)
    elif (out / CALIBRATION_FILE).exists():  # an earlier model's, in a folder written over
        (out / CALIBRATION_FILE).unlink()
    return out


def _folder_config(path: Path) -> NXTPConfig:

    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: a model folder is one written by nxtp export --format safetensors, "
            f"nxtp import-official or NXTP.save_pretrained"
        )
    config = yaml.safe_load(file.read_text())
    return NXTPConfig.from_dict({**config, "tokenizer": str(path / config["tokenizer"])}, source=str(file))


def load_folder(path: str | Path, calibration: bool = True) -> NXTP:
    """Rebuild the model of a model folder, in eval mode (no pickle involved), with its calibration unless not
    ``calibration``."""

    path = Path(path)
    model = NXTP(_folder_config(path))
    missing, unexpected = safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: missing keys {missing}, unexpected keys {unexpected}")
    file = path / CALIBRATION_FILE
    text = file.read_text() if calibration and file.is_file() else None
    return attach_calibration(model.eval(), text, str(file))


# .ckpt files ------------------------------------------------------------------------------------------------


def checkpoint_config(checkpoint: dict[str, Any], source: str = "the checkpoint") -> NXTPConfig:
    """The ``NXTPConfig`` a ``.ckpt``'s model was built with (checkpoints of every version of ``nxtp fit``)."""
    if CONFIG_KEY in checkpoint:
        return NXTPConfig.from_dict(checkpoint[CONFIG_KEY], source)
    stored = checkpoint.get("hyper_parameters") or {}
    if "nxtp" in stored:  # LitNXTP(nxtp=NXTPConfig(...), ...), as a dict or the dataclass itself
        nxtp = stored["nxtp"]
        return nxtp if isinstance(nxtp, NXTPConfig) else NXTPConfig.from_dict(dict(nxtp), source)
    if not all(k in stored for k in ("vision", "decoder", "tokenizer")):
        raise ValueError(f"{source}: no model config (neither {CONFIG_KEY!r} nor LitNXTP hyper-parameters)")
    return NXTPConfig.from_dict({k: stored[k] for k in _FLAT_KEYS if k in stored}, source)


def model_state(checkpoint: dict[str, Any], source: str = "the checkpoint") -> dict[str, Tensor]:
    """The ``NXTP`` state dict inside a ``.ckpt``: its ``model.*`` tensors (the rest, e.g. metric embedders, is not
    part of the recognizer)."""
    if "state_dict" not in checkpoint:
        raise ValueError(f"{source}: no 'state_dict'; expected a .ckpt written by nxtp fit")
    return {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for ``tokenizer``, by name (what a ``.ckpt`` stores)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def load_checkpoint_model(path: str | Path, trust: bool = False, calibration: bool = True) -> NXTP:
    """Rebuild the model of a ``.ckpt``, in eval mode. Its tokenizer is the one its config names where that
    exists, else the copy the checkpoint stores (a checkpoint copied to another machine still loads)."""

    checkpoint = load_checkpoint(path, trust=trust)
    config = checkpoint_config(checkpoint, str(path))
    stored = checkpoint.get(TOKENIZER_KEY)
    with tempfile.TemporaryDirectory(prefix="nxtp-tokenizer-") as folder:
        if stored and not Path(config.tokenizer).exists():
            for name, data in stored.items():
                (Path(folder) / name).write_bytes(data)
            config.tokenizer = folder  # read into memory while building; the folder is not needed after
        model = NXTP(config)
    model.load_state_dict(model_state(checkpoint, str(path)))
    text = checkpoint.get(CALIBRATION_KEY) if calibration else None
    return attach_calibration(model.eval(), text, f"{path} [{CALIBRATION_KEY}]")


def load_model(source: str | Path, trust: bool = False, calibration: bool = True) -> NXTP:
    """The model a source holds, in eval mode: a model folder or a ``.ckpt`` (see the module's docstring), with its
    label calibration as ``model.calibration`` (None without one, or when not ``calibration``; ``CalibrationError``
    for one that does not parse or was fitted on other weights)."""
    if "://" not in str(source) and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such model folder or checkpoint")
    if is_model_folder(source):
        return load_folder(source, calibration)
    return load_checkpoint_model(source, trust, calibration)


def read_config(source: str | Path, trust: bool = False) -> NXTPConfig:
    """The config alone of a model folder or ``.ckpt`` (tensors memory-mapped, not read)."""

    if is_model_folder(source):
        return _folder_config(Path(source))
    return checkpoint_config(load_checkpoint(source, trust=trust, mmap="://" not in str(source)), str(source))


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The NXTP state dict stored at ``path``, read without running code from it.

    ``path`` is a model folder, a ``.safetensors`` file, or a Lightning ``.ckpt`` written by ``nxtp fit`` (read
    with the allow-list of ``checkpoint_io.load_checkpoint``; only its ``model.*`` tensors are kept).
    """

    path = Path(path) if "://" not in str(path) else path
    if isinstance(path, Path) and not path.exists():
        raise FileNotFoundError(f"model.optimization.init_from={path}: no such file or folder")
    if isinstance(path, Path) and path.is_dir():
        path = path / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: a weights folder is one written by save_pretrained, "
                f"nxtp import-official or nxtp export --format safetensors"
            )
    if str(path).endswith(".safetensors"):
        return safetensors.torch.load_file(str(path))
    return model_state(load_checkpoint(path), str(path))


def _listed(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def load_weights(
    model: nn.Module, state: dict[str, Tensor], allow_missing: list[str] = (), source: str = "the source"
) -> list[str]:
    """Copy ``state`` into ``model``, whose names and shapes it must match exactly; return the keys left as built.

    Keys of ``model`` absent from ``state`` are allowed only where they match a pattern of ``allow_missing``
    (fnmatch); they keep the model's own initialisation. Otherwise a ``ValueError`` lists every missing,
    unexpected and mis-shaped key (with both shapes), in the terms of ``model.optimization.init_from`` and
    ``model.optimization.init_allow_missing`` (what ``nxtp fit`` calls them).
    """
    expected = model.state_dict(keep_vars=True)
    # Tied tensors (e.g. lm_head tied to the embeddings) are stored once by safetensors: any alias will do.
    storage: dict[int | str, set[str]] = {}
    ptr = {name: t.data_ptr() or name for name, t in expected.items()}  # empty and meta tensors all give 0
    for name in expected:
        storage.setdefault(ptr[name], set()).add(name)
    absent = sorted(k for k in expected if not storage[ptr[k]] & state.keys())
    allowed = [k for k in absent if any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    missing = [k for k in absent if k not in allowed]
    unexpected = sorted(state.keys() - expected.keys())
    mis_shaped = [
        f"{k}: source {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in sorted(state.items())
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [
            "missing from the source (name them in model.optimization.init_allow_missing to keep them as built): "
            + _listed(missing)
            if missing
            else "",
            f"not in the model: {_listed(unexpected)}" if unexpected else "",
            f"shape mismatches: {_listed(mis_shaped)}" if mis_shaped else "",
        ]
        raise ValueError(
            f"model.optimization.init_from={source} does not fit the model built from the config (the model config "
            f"must describe the source's architecture, e.g. --model FOLDER/config.yaml for a "
            f"save_pretrained folder):\n  " + "\n  ".join(p for p in problems if p)
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return allowed


# label calibrations ------------------------------------------------------------------------------------------


def model_identity(model: nn.Module | dict[str, Tensor]) -> str:
    """A short hash of a model's state dict (names, dtypes, shapes and bytes): the same weights give the same
    identity whether they come from a ``.ckpt``, a model folder or an export."""

    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def parse_calibration(text: str, source: str):
    """A ``calibration.Calibration`` from its JSON text; ``CalibrationError`` naming ``source`` otherwise."""

    return Calibration.from_json(text, source)


def attach_calibration(model: NXTP, text: str | None, source: str) -> NXTP:
    """Set ``model.calibration`` from a calibration's JSON text (None: no calibration), checking that it was
    fitted on these weights."""

    calibration = None if text is None else parse_calibration(text, source)
    if calibration is not None and calibration.model_id != (identity := model_identity(model)):
        raise CalibrationError(
            f"{source}: this calibration was fitted on the model {calibration.model_id}, not on this one "
            f"({identity}); run nxtp calibrate for this model"
        )
    model.calibration = calibration
    return model


def read_calibration(source: str | Path, trust: bool = False):
    """The ``calibration.Calibration`` a model folder or ``.ckpt`` holds, or None; not checked against the weights
    (``load_model`` does that)."""

    if is_model_folder(source):
        file = Path(source) / CALIBRATION_FILE
        return parse_calibration(file.read_text(), str(file)) if file.is_file() else None
    text = load_checkpoint(source, trust=trust, mmap="://" not in str(source)).get(CALIBRATION_KEY)
    return None if text is None else parse_calibration(text, f"{source} [{CALIBRATION_KEY}]")


def write_calibration(target: str | Path, calibration, trust: bool = False) -> Path:
    """Store ``calibration`` with the model at ``target``: ``CALIBRATION_FILE`` in a model folder, ``CALIBRATION_KEY``
    in a ``.ckpt`` (rewritten atomically), or a ``.json`` file of its own; return where it went."""

    target = Path(target)
    if is_model_folder(target) or target.suffix == ".json":
        file = target / CALIBRATION_FILE if is_model_folder(target) else target
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(calibration.to_json() + "\n")
        tmp.replace(file)  # a reader never sees half a file
        return file
    checkpoint = load_checkpoint(target, trust=trust)
    checkpoint[CALIBRATION_KEY] = calibration.to_json()
    AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    return target


# what a training run stores beside the model ----------------------------------------------------------------


@dataclass
class TrainingState:
    """What resuming a run needs beyond Lightning's own state: how long the run is meant to be (a run that got
    there is finished, and is not resumed), and its counts of skipped samples and non-finite steps."""

    max_steps: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0

    def save(self, checkpoint: dict[str, Any]) -> None:
        if self.max_steps is not None:
            checkpoint[MAX_STEPS_KEY] = self.max_steps
        checkpoint[TRAIN_SKIPPED_KEY] = {"skipped": dict(self.skipped), "nonfinite": self.nonfinite_steps}

    @classmethod
    def load(cls, checkpoint: dict[str, Any]) -> TrainingState:
        counts = checkpoint.get(TRAIN_SKIPPED_KEY) or {}
        return cls(checkpoint.get(MAX_STEPS_KEY), dict(counts.get("skipped", {})), counts.get("nonfinite", 0))


def save_model_record(checkpoint: dict[str, Any], model: NXTP) -> None:
    """Store in a ``.ckpt`` what rebuilds ``model`` anywhere: its config as plain data and its tokenizer's files."""
    checkpoint[CONFIG_KEY] = model.config.to_dict()
    checkpoint[TOKENIZER_KEY] = tokenizer_files(model.tokenizer)


def rng_state() -> dict[str, Any]:
    """This process's random streams (torch CPU, numpy, Python), as plain data a weights-only load accepts."""

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def save_rng_states(checkpoint: dict[str, Any], states: list[dict[str, Any]]) -> None:
    """Store every rank's ``rng_state()``, in rank order."""
    checkpoint[RNG_KEY] = states


def restore_rng_state(checkpoint: dict[str, Any], rank: int) -> bool:
    """Continue this rank's random streams where the checkpoint left them; False if it holds none for ``rank``
    (a run resumed on more ranks than it was saved from: those ranks keep their seeded streams).

    Checkpoints written before states were kept per rank hold rank 0's alone, which every rank then takes."""

    stored = checkpoint.get(RNG_KEY)
    if isinstance(stored, dict):
        stored = [stored] * (rank + 1)
    if not stored or rank >= len(stored):
        return False
    state = stored[rank]
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    return True
