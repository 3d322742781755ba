"""Shared test set-up: offline assets from tests/fixtures and small random models."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import forked
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("NLTK_DATA", str(FIXTURES / "nltk_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs several test processes at once (pytest-xdist). Each of them, and every command a test starts,
# gets its share of the cores: with torch's default of a thread per core in each, two 30-step fits side by side
# take three times as long as one alone (their threads spin waiting for each other), instead of the same time.
TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if TEST_PROCESSES > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // TEST_PROCESSES)))

# numpy 1.26 runs `lscpu` in a subprocess when numpy.testing is first imported: here, not inside a unit test
import numpy.testing  # noqa: E402, F401
import torch  # noqa: E402

from datamodules.synthetic import build_dataset  # noqa: E402
from datamodules.tokenizer import build_tokenizer  # noqa: E402
from lightning_modules.decoder import DecoderConfig  # noqa: E402
from lightning_modules.nxtp import NXTP, NXTPConfig  # noqa: E402
from lightning_modules.vision import VisionConfig  # noqa: E402

LLAMA_TOKENIZER = FIXTURES / "llama2-tokenizer"
OFFICIAL = FIXTURES / "nxtp-official-tiny"


def print_config(argv: list[str], monkeypatch, capsys) -> dict:
    """The config that `nxtp ARGV --print_config` prints, parsed, from the CLI in this process."""
    import yaml

    from lightning_modules.cli import main

    monkeypatch.setattr(sys, "argv", ["nxtp", *argv, "--print_config"])
    with pytest.raises(SystemExit) as end:
        main()
    assert end.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


# The model and data `make train` leaves behind: the checks of trained maps and boxes run where they exist.
TRAINED_DEFAULT = Path(__file__).parents[1] / "logs/default/version_0/checkpoints/last.ckpt"
TEST_SHARD = Path(__file__).parents[1] / "data/shapes/test/shard-000000.tar"
needs_trained_default = pytest.mark.skipif(
    not (TRAINED_DEFAULT.exists() and TEST_SHARD.exists()),
    reason="needs the default model and data of `make train` (logs/default/version_0, data/shapes)",
)


def experiment(name: str):
    """``experiments/NAME.py`` as a module (experiments/ is no package)."""
    import importlib.util

    path = Path(__file__).parents[1] / f"experiments/{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_attention_maps():
    """``experiments/eval_attention_maps.py`` as a module."""
    return experiment("eval_attention_maps")


def tiny_nxtp(seed: int = 0, hidden: int = 64, blocks: int = 2, vision: VisionConfig | None = None, **kwargs) -> NXTP:
    """A small random NXTP (4x4 image tokens, LLaMA-2 tokenizer; ``vision``: another tower) for tests."""
    torch.manual_seed(seed)
    decoder = DecoderConfig(
        config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    )
    speed = {k: kwargs.pop(k) for k in ("attention", "pad_to_multiple") if k in kwargs}
    vision = vision or VisionConfig(model_name="nxtp-tiny-vit")
    config = NXTPConfig(vision, decoder, str(LLAMA_TOKENIZER), **kwargs)
    return NXTP(config, **speed).eval()


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    return LLAMA_TOKENIZER


# end-to-end helpers: the `nxtp` command as a user runs it ----------------------------------------------

ROOT = Path(__file__).parents[1]
NXTP_CLI = [sys.executable, "-m", "lightning_modules.cli"]
_server: forked.Server | None = None  # this test process's forking server, started on first use
_fresh = False  # --fresh-commands
_START_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--fresh-commands",
        action="store_true",
        help="start every nxtp command a test runs in a fresh interpreter, not forked (tests/forked.py)",
    )


def pytest_configure(config) -> None:
    global _fresh
    _fresh = config.getoption("--fresh-commands")


def pytest_sessionfinish(session) -> None:
    if _server is not None:
        _server.stop()
        shutil.rmtree(_server.folder, ignore_errors=True)


def popen(cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen | forked.Forked:
    """Start ``cmd`` from the repository root with ``env``: forked from this test process's server when it is
    ``python -m MODULE`` (tests/forked.py: the same command without its ~6 CPU-seconds of imports), else as a fresh
    process."""
    global _server
    if not _fresh and cmd[:2] == [sys.executable, "-m"]:
        if _server is None:  # with the environment the test process started with, not the test's own
            _server = forked.Server(Path(tempfile.mkdtemp(prefix="nxtp-forked-")), _START_ENV)
        if _server.forks(cmd, env):
            return _server.start(cmd, env, ROOT, **kwargs)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **kwargs)


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command from the repository root with the project importable; output captured as text. A
    ``python -m MODULE`` command is forked from this test process's server (``popen``, ``tests/forked.py``).

    The command runs in a process group of its own that is killed whole after ``timeout`` seconds, so that a hung
    run (and every rank or worker it started) fails the test instead of stalling the suite.
    """
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    with popen(
        cmd,
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(cmd[:6])} ... did not end within {timeout} s\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_with_imports(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``nxtp ARGS`` started as ``run`` starts it, under ``python -X importtime``: its result, and the modules it
    imported (for the checks that a command does not pay for what it does not use)."""
    result = run(NXTP_CLI[:1] + ["-X", "importtime"] + NXTP_CLI[1:] + args)
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result, {line.rsplit("|", 1)[1].strip() for line in lines}


def nxtp_here(args: list[str], monkeypatch) -> int:
    """``nxtp ARGS`` run in this process (its entry point, from the repository root), for a result that is the
    truth a test compares with rather than the command under test: it saves a start of the command (importing torch
    and Lightning, most of a short run's time). Returns the exit status. What a run leaves behind in the process is
    put back: the signal handlers it installs (``GracefulStop``, ``SlurmRequeue``) and the environment it sets
    (``seed_everything``'s ``PL_GLOBAL_SEED``), which the commands a test starts afterwards would inherit."""
    from lightning_modules.cli import run as run_command  # not `main`, which leaves what it froze frozen at its exit

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    environ = dict(os.environ)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # as `run` starts a command: for the commands it starts in turn
    monkeypatch.setattr(sys, "argv", ["nxtp", *args])
    try:
        run_command(args)
    except SystemExit as end:
        return end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        os.environ.clear()
        os.environ.update(environ)
    return 0


def run_ranks(fn, args: tuple, nprocs: int = 2, timeout: float = 300) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, as ``torch.multiprocessing.spawn`` runs it, with a deadline: a
    rank that fails fails the test; ranks still running after ``timeout`` seconds are killed and fail it. Spawned,
    not forked: a fork of a process whose OpenMP threads have run (a loaded sentence embedder) can hang."""
    import torch.multiprocessing as mp

    ranks = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ranks.join(timeout=max(0.0, deadline - time.time())):
            if time.time() >= deadline:
                raise AssertionError(f"{fn.__name__}: ranks still running after {timeout} s")
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
                process.join()


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_until(cmd: list[str], path: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start a command as ``run`` does and return it once ``path`` exists (or it ended, or 300 s passed): the
    moment to interrupt a training run that has written its first checkpoint."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    proc = popen(cmd, env, **kwargs)
    deadline = time.time() + 300
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    return proc


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (with its tokenizer), built once per test session."""
    data = tmp_path_factory.mktemp("data") / "shapes"
    build_dataset(data, 256, 32, 32, samples_per_shard=128, workers=1)  # as `make data` does, in this process
    build_tokenizer(data)
    return data


def fit_command(data: Path, save_dir: Path, max_steps: int, tokenizer: Path | None = None) -> list[str]:
    return NXTP_CLI + [
        "fit",
        "--config",
        "configs/experiment/default.yaml",
        "--model.nxtp.tokenizer",
        str(tokenizer or data / "tokenizer"),
        "--model.evaluation.semantic_metric",
        "false",
        "--test_after_fit",
        "false",
        "--data.train_shards",
        str(data / "train/shard-{000000..000001}.tar"),
        "--data.val_shards",
        str(data / "val/shard-000000.tar"),
        "--data.batch_size",
        "16",
        "--data.num_workers",
        "0",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.val_check_interval",
        "10",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
    ]


def fit_overrides(shapes: Path, tmp_path: Path, max_steps: int) -> dict[str, str]:
    """The end-to-end tests' short fit (``fit_command``) as a sweep's ``fixed`` keys, logger excluded."""
    command = fit_command(shapes, tmp_path / "logs", max_steps)
    start = command.index("--model.nxtp.tokenizer")
    return {
        k.lstrip("-"): v
        for k, v in zip(command[start::2], command[start + 1 :: 2])
        if not k.startswith("--trainer.logger")
    }


def assert_resumed_to_the_end(resumed: subprocess.CompletedProcess, version: Path, steps: int, stopped_at: int) -> None:
    """A resumed run continued in its own folder from where it stopped and ended with its final checkpoint."""
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["global_step"] == steps
    # The run printed its training time, kept in its checkpoints (Lightning's Timer) so that a resume adds to it.
    assert f"training: {steps} steps in" in resumed.stdout
    stored = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["Timer"]
    assert 0 < stored["time_elapsed"]["train"] <= metrics["train_time_s"]
    assert not (version.parent / "version_1").exists()


@pytest.fixture(autouse=True)
def unit_tests_start_nothing(request, monkeypatch) -> None:
    """Under ``make test-unit`` (``-m "not slow and not e2e"``), a test that starts a process or a Trainer fails
    and says to mark it ``e2e``: the unit run stays quick, and its selection cannot drift."""
    if "not e2e" not in (request.config.getoption("markexpr") or ""):
        return

    def refuse(what: str):
        def call(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} {what}: mark it @pytest.mark.e2e (make test-unit runs none)")

        return call

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("starts a process"))
    import lightning.pytorch as pl

    for stage in ("fit", "validate", "test", "predict"):
        monkeypatch.setattr(pl.Trainer, stage, refuse(f"runs Trainer.{stage}"))


def pytest_collection_modifyitems(config, items) -> None:
    """Modules with the most slow tests first. `make test` runs the modules in parallel (pytest-xdist, one module
    to a worker, its module fixtures built once): the long ones start at once and the quick ones fill in at the end."""
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: each module's own order stays
