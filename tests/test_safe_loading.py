"""Safe checkpoint loading: a ``.ckpt`` whose pickle would run code is refused everywhere a checkpoint is read,
without running it; the project's own checkpoints still load (and resume)."""

import pathlib

import lightning as L
import pytest
import torch
from conftest import LLAMA_TOKENIZER, NXTP_CLI, run
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_modules import Recognizer
from lightning_modules.batch import Batch
from lightning_modules.checkpoint_io import AtomicCheckpointIO, UntrustedCheckpointError, load_checkpoint
from lightning_modules.cli.export import export_main
from lightning_modules.decoder import DecoderConfig
from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
from lightning_modules.nxtp import NXTPConfig
from lightning_modules.optimization import OptimizationConfig
from lightning_modules.sampling import recognize
from lightning_modules.sequence import collate_text
from lightning_modules.vision import VisionConfig


class Touch:
    """Unpickling this creates ``path``: the harmless stand-in for a payload such as ``os.system``."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.fixture
def malicious(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A checkpoint-shaped file whose pickle creates ``marker``, and that marker path (not created)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "downloaded.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": Touch(marker)}}, path)
    return path, marker


def assert_refused(message: str) -> None:
    assert "pathlib.Path" in message and "getattr" in message  # the globals the payload needs
    assert "--trust-checkpoint" in message and "trust=True" in message


def batches(module: LitNXTP, n: int = 3) -> torch.utils.data.DataLoader:
    model = module.model
    torch.manual_seed(0)
    return torch.utils.data.DataLoader(
        [
            Batch(
                torch.randn(2, 3, 64, 64),
                collate_text([model.sequences(model.prompt, ["dog", "cat"])] * 2, model.sequences.pad_id),
                [["dog", "cat"]] * 2,
                ["a", "b"],
            )
            for _ in range(n)
        ],
        batch_size=None,
    )


def trainer(root: pathlib.Path, steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
    )


@pytest.fixture(scope="module")
def project_checkpoint(tmp_path_factory) -> tuple[pathlib.Path, LitNXTP]:
    """A checkpoint as the project writes it (Lightning's trainer state, optimizer, scheduler, tokenizer, RNG
    states), from a module built in Python with config dataclasses."""
    root = tmp_path_factory.mktemp("ckpt")
    decoder = DecoderConfig(
        config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
        )
    )
    module = LitNXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit", conv_stem=True), decoder, str(LLAMA_TOKENIZER)),
        OptimizationConfig(lr=1e-3),
        EvaluationConfig(semantic_metric=False, log_images=0, topk=[1]),
    )
    trainer(root, 2).fit(module, train_dataloaders=batches(module), val_dataloaders=[])
    return root / "last.ckpt", module


@pytest.mark.e2e
def test_the_projects_checkpoint_loads_safely_with_its_weights(project_checkpoint):
    path, module = project_checkpoint
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []  # plain data only
    assert load_checkpoint(path)["global_step"] == 2
    recognizer = Recognizer.from_checkpoint(path)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = recognize(module.model.eval(), pixels, topk=3)
    assert recognizer.label(list(pixels), topk=3) == want
    assert Recognizer.from_checkpoint(path, trust=True).label(list(pixels), topk=3) == want


def test_a_checkpoint_whose_hyperparameters_pickle_the_configs_loads_through_the_allow_list(
    project_checkpoint, tmp_path
):
    # Before hyper-parameters were saved as plain data, a module built in Python pickled VisionConfig and
    # DecoderConfig into its checkpoint, with the architecture at the top of its hyper-parameters.
    path, module = project_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    nxtp = module.model.config
    checkpoint["hyper_parameters"] = {"vision": nxtp.vision, "decoder": nxtp.decoder, "tokenizer": nxtp.tokenizer}
    del checkpoint["nxtp_config"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.ckpt")) == {
        "lightning_modules.vision.VisionConfig",
        "lightning_modules.decoder.DecoderConfig",
    }
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = recognize(module.model.eval(), pixels, topk=3)
    assert Recognizer.from_checkpoint(tmp_path / "old.ckpt").label(list(pixels), topk=3) == want


@pytest.mark.e2e
def test_a_run_resumes_from_the_projects_checkpoint(project_checkpoint, tmp_path):
    path, module = project_checkpoint
    fresh = LitNXTP(**{**module.hparams})
    resumed = trainer(tmp_path, 3)
    resumed.fit(fresh, train_dataloaders=batches(fresh), val_dataloaders=[], ckpt_path=path)
    assert resumed.global_step == 3


def test_a_malicious_checkpoint_runs_code_only_when_trusted(malicious):
    path, marker = malicious
    with pytest.raises(UntrustedCheckpointError) as refused:
        load_checkpoint(path)
    assert_refused(str(refused.value))
    assert not marker.exists()
    load_checkpoint(path, trust=True)  # the payload is real: trusting the file runs it
    assert marker.exists()


def test_recognizer_resume_and_export_refuse_a_malicious_checkpoint(malicious, tmp_path, capsys):
    path, marker = malicious
    with pytest.raises(UntrustedCheckpointError) as refused:
        Recognizer.from_checkpoint(path)
    assert_refused(str(refused.value))
    with pytest.raises(UntrustedCheckpointError):  # what Lightning calls to resume a run
        AtomicCheckpointIO().load_checkpoint(path)
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
    assert_refused(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_nxtp_label_refuses_a_malicious_checkpoint(malicious, tmp_path):
    path, marker = malicious
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(image)
    result = run(NXTP_CLI + ["label", "--checkpoint", str(path), str(image)])
    assert result.returncode == 2, result.stderr
    assert_refused(result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not marker.exists()
