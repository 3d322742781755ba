"""``nxtp serve``: an HTTP server that labels images, on LitServe with dynamic batching (see ``serving``).

nxtp serve --checkpoint CKPT.ckpt [--port 8000] [--max-batch-size 16 --batch-timeout 0.01]
curl --data-binary @cat.jpg 'http://127.0.0.1:8000/predict?topk=5'
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
from pathlib import Path

from ..inference import TOPK, InferenceOptions
from . import imported


def accelerator_devices(device: str) -> tuple[str, int | list[int] | str]:
    """LitServer's ``accelerator`` and ``devices`` for ``--device``: ``cpu``, ``cuda`` (every GPU), ``cuda:1``,
    ``cuda:0,1``, ``mps``, ``auto``."""
    kind, _, indices = device.partition(":")
    if indices:
        return kind, [int(i) for i in indices.split(",")]
    return kind, 1 if kind == "cpu" else "auto"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nxtp serve",
        description="Serve the recognizer over HTTP: POST an image "
        "to /predict, get its labels as `nxtp label` writes them.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a .ckpt written by `nxtp fit`, or a folder written by `nxtp export` / `nxtp import-official`",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let a .ckpt's pickle create any Python object, which can run code: only for files you "
        "trust (as for `nxtp label`)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        choices=["127.0.0.1", "0.0.0.0", "::"],
        help="interface to listen on (0.0.0.0 or :: open the server to other machines)",
    )
    parser.add_argument("--port", type=int, default=8000)
    InferenceOptions.add_arguments(
        parser,
        notes={
            "device": "here cuda is every GPU, and cuda:0,1 (these GPUs) or auto work too",
            "topk": "the default of the request option topk",
            "min_prob": "the default of the request option min_prob",
            "threshold": "the default of the request option threshold",
            "locate": "the default of the request option locate",
            "max_image_pixels": "answered 422",
        },
        exclude=["batch_size"],  # LitServe batches requests: --max-batch-size
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests labelled together at most")
    parser.add_argument(
        "--batch-timeout", type=float, default=0.01, help="seconds a batch waits to fill before it runs anyway"
    )
    parser.add_argument("--workers-per-device", type=int, default=1, help="model copies (processes) per device")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default on the CPU: the cores shared among the workers)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds a request may wait for a worker before it is answered 504"
    )
    parser.add_argument("--max-payload-mb", type=float, default=16.0, help="refuse larger request bodies (413)")
    parser.add_argument(
        "--slow-queue",
        action="store_true",
        help="answers travel back from the workers through multiprocessing queues instead of ZeroMQ "
        "(LitServe's fast_queue, the default here)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def serve_main(argv: list[str]) -> int:
    """``nxtp serve``: runs until SIGTERM or Ctrl-C, then stops its workers and returns 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = InferenceOptions.from_args(args, batch_size=args.max_batch_size)
    except ValueError as e:  # options that contradict each other
        parser.error(str(e))
    from ..serving import FIELDS, MAX_TOPK

    defaults = {
        "topk": TOPK if options.topk is None else options.topk,
        "min_prob": options.min_prob,
        "threshold": options.threshold,
        "locate": options.locate,
    }
    for name, value in defaults.items():  # the defaults obey the rules of the request options they stand for
        try:
            FIELDS[name](value, False)
        except ValueError as e:
            parser.error(f"--{name.replace('_', '-')}: {str(e).removeprefix(f'{name}: ')}")
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port: from 1024 to 65535 (LitServe's range), got {args.port}")
    if args.max_batch_size < 1 or args.batch_timeout < 0 or args.workers_per_device < 1 or args.timeout <= 0:
        parser.error(
            "--max-batch-size and --workers-per-device at least 1, --batch-timeout at least 0, --timeout above 0"
        )
    if not Path(args.checkpoint).exists():
        print(
            f"nxtp serve: {args.checkpoint} does not exist: train the default model with `make train`, or give "
            f"another checkpoint (make serve CHECKPOINT=PATH)",
            file=sys.stderr,
        )
        return 2

    import litserve as ls
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse

    from ..calibration import CalibrationError
    from ..serving import RecognizerAPI, RequestReader, describe

    imported()

    try:
        info = describe(args.checkpoint, trust=args.trust_checkpoint, decode=options.decode)
    except (pickle.UnpicklingError, CalibrationError) as e:  # UntrustedCheckpointError, a corrupt file
        print(f"nxtp serve: {e}", file=sys.stderr)
        return 2
    if options.threshold == "auto" and info["calibration"] is None:
        print(f"nxtp serve: --threshold auto: {args.checkpoint} has no calibration (nxtp calibrate)", file=sys.stderr)
        return 2
    accelerator, devices = accelerator_devices(options.device)
    threads = args.threads
    if threads is None and accelerator == "cpu":
        threads = max(1, (os.cpu_count() or 1) // args.workers_per_device)
    max_payload = int(args.max_payload_mb * (1 << 20))
    info.update(
        defaults=defaults,
        max_topk=MAX_TOPK,
        max_payload_bytes=max_payload,
        max_image_pixels=options.max_image_pixels,
        max_batch_size=options.batch_size,
        batch_timeout=args.batch_timeout,
        precision=options.precision,
    )
    api = RecognizerAPI(
        str(Path(args.checkpoint).resolve()),
        options,
        trust=args.trust_checkpoint,
        threads=threads,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=args.workers_per_device,
        timeout=args.timeout,
        model_metadata=info,
        fast_queue=not args.slow_queue,
        middlewares=[(RequestReader, {"max_payload_bytes": max_payload, "defaults": defaults})],
    )

    async def http_error(request, exc: HTTPException) -> JSONResponse:
        """LitServe's own errors (504 for a request that waited too long, 500) in the shape of ours."""
        message = str(exc.detail)
        if exc.status_code == 504:
            message = f"request timed out: it waited more than {args.timeout} s for a worker (nxtp serve --timeout)"
        return JSONResponse({"error": message, "field": None}, status_code=exc.status_code)

    server.app.add_exception_handler(HTTPException, http_error)

    main_pid = os.getpid()

    def stop(signum, frame) -> None:
        # LitServer.run shuts its workers down on KeyboardInterrupt; SIGTERM (kill, systemd, docker stop) takes
        # the same path. A second signal during the shutdown is ignored so that it can finish.
        if os.getpid() != main_pid:  # an HTTP server process (forked) that uvicorn has already shut down
            sys.exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)
    except KeyboardInterrupt:  # a signal before LitServer.run took over
        pass
    return 0
