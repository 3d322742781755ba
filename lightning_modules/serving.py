"""``nxtp serve``: the recognizer behind HTTP, on LitServe with dynamic batching.

Two halves, in two kinds of process:

* ``RequestReader`` (ASGI middleware, in the HTTP server processes) reads ``POST /predict`` in any of its three
  forms, checks size, fields and options, and answers a bad request with a 4xx JSON error at once; a good one
  reaches LitServe as one canonical JSON object (``{"image": base64, "filename", "topk", "min_prob"}``).
* ``RecognizerAPI`` (LitAPI, in the inference workers) decodes the image with the project's image loader, labels
  the batch LitServe collected with ``Recognizer.label`` and answers each request with the JSON of ``nxtp label``.

Request (options in the query string, or as fields of a JSON or multipart body; the same field twice is an error):

* raw body: the image file's bytes, any content type but JSON and multipart (``curl --data-binary @cat.jpg``);
* ``multipart/form-data``: the file in field ``image`` (``curl -F image=@cat.jpg -F topk=5``);
* ``application/json``: ``{"image": "<base64>", "filename": "cat.jpg", "topk": 5, "min_prob": 0.1}``.

``threshold=auto`` keeps each label at its fitted threshold (a calibrated model only; 400 otherwise). A calibrated
model's ``prob`` is the calibrated probability, and each label also gives its raw one-shot ``score``.
``locate=true`` adds where each label is: ``point``, ``box`` and ``boxes`` in the uploaded image's pixels (after
its EXIF orientation), as ``nxtp label --locate`` writes them.

Fields are looked up in ``FIELDS``, one parser each, so that a later field (``vocabulary``: a list of strings in
JSON, repeated in a form) is one entry more. Answer: ``{"image": FILENAME, "labels": [{"label", "prob"}]}``,
``image`` only where the request named one (the multipart file name or ``filename``). Errors:
``{"error": MESSAGE, "field": FIELD}`` with 400 (malformed request), 413 (body over ``--max-payload-mb``),
422 (not an image, corrupt or truncated, more pixels than ``--max-image-pixels`` by its header), 504 (waited in
the queue longer than ``--timeout``). Every answer carries ``X-Batch-Size``: how many requests its batch held.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import litserve as ls
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .inference import InferenceOptions, Labelled, autocast

MAX_TOPK = 100  # branches per image; more multiplies a batch's work for labels far below any useful probability


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status``, a message naming the problem, and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field

    def response(self, batch_size: int | None = None) -> JSONResponse:
        headers = {"X-Batch-Size": str(batch_size)} if batch_size else None
        return JSONResponse({"error": str(self), "field": self.field}, status_code=self.status, headers=headers)


def _topk(value: Any, text: bool) -> int:
    if text:  # query string and form fields are text
        try:
            value = int(value)
        except ValueError:
            raise RequestError(400, f"topk: an integer from 1 to {MAX_TOPK}, got {value!r}", "topk") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOPK:
        raise RequestError(400, f"topk: an integer from 1 to {MAX_TOPK}, got {value!r}", "topk")
    return value


def _min_prob(value: Any, text: bool) -> float:
    message = f"min_prob: a number from 0 to 1, got {value!r}"
    if text:
        try:
            value = float(value)
        except ValueError:
            raise RequestError(400, message, "min_prob") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 1):
        raise RequestError(400, message, "min_prob")
    return float(value)


def _threshold(value: Any, text: bool) -> str | None:
    if value in (None, "auto") or (text and value == ""):
        return value or None
    raise RequestError(400, f"threshold: 'auto' (each label's fitted threshold) or absent, got {value!r}", "threshold")


def _locate(value: Any, text: bool) -> bool:
    if text and isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
        return value.lower() in ("true", "1")
    if isinstance(value, bool):
        return value
    raise RequestError(400, f"locate: true or false (where each label is: point and box), got {value!r}", "locate")


def _filename(value: Any, text: bool) -> str:
    if not isinstance(value, str) or len(value) > 1024:
        raise RequestError(400, "filename: a string of at most 1024 characters", "filename")
    return value


def _image_base64(value: Any, text: bool) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, "image: the image file's bytes as a base64 string", "image")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image: not valid base64 ({e})", "image") from None
    if not data:
        raise RequestError(400, "image: empty", "image")
    return data


# Every field a request may carry and how it is read (value, is_text) -> value. ``image`` comes from the body.
FIELDS: dict[str, Callable[[Any, bool], Any]] = {
    "image": _image_base64,
    "filename": _filename,
    "topk": _topk,
    "min_prob": _min_prob,
    "threshold": _threshold,
    "locate": _locate,
}


def parse_fields(fields: Mapping[str, Any], defaults: Mapping[str, Any], text: bool) -> dict[str, Any]:
    """Options checked and converted by ``FIELDS``, defaults filled in; unknown fields are refused by name."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(
            400, f"unknown field {', '.join(map(repr, unknown))}; known fields: {', '.join(FIELDS)}", unknown[0]
        )
    return {**defaults, **{name: FIELDS[name](value, text) for name, value in fields.items()}}


async def _form_fields(scope: Scope, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Text fields and the uploaded file (with its name as ``filename``) of a multipart body."""

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(scope, replay).form(max_files=2, max_fields=len(FIELDS)) as form:
            items = list(form.multi_items())
            fields: dict[str, Any] = {}
            data = None
            for name, value in items:
                if name in fields or (name == "image" and data is not None):
                    raise RequestError(400, f"{name}: given twice", name)
                if isinstance(value, UploadFile):
                    if name != "image":
                        raise RequestError(400, f"{name}: a file upload; the image goes in field 'image'", name)
                    data = await value.read()
                    if value.filename:
                        fields["filename"] = value.filename
                elif name == "image":
                    raise RequestError(400, "image: a file upload (curl -F image=@FILE), not a text field", "image")
                else:
                    fields[name] = value
    except RequestError:
        raise
    except Exception as e:  # starlette's MultiPartException and the parser's own errors: a malformed body
        raise RequestError(
            400, f"multipart body: {getattr(e, 'detail', None) or getattr(e, 'message', None) or e}"
        ) from None
    return fields, data


class RequestReader:
    """ASGI middleware for ``POST /predict``: reads the image and options of a request in any of its three forms,
    refuses what is wrong with a 4xx JSON error, and passes the rest on as LitServe's canonical JSON body.

    Here, in the HTTP server process, a bad request costs no place in a batch and no worker time.
    """

    def __init__(
        self,
        app: ASGIApp,
        path: str = "/predict",
        max_payload_bytes: int = 16 << 20,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.app, self.path, self.max_payload_bytes = app, path, max_payload_bytes
        self.defaults = dict(defaults or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self.read_body(scope, receive)
            canonical = await self.canonical(scope, body)
        except RequestError as e:
            return await e.response()(scope, receive, send)
        except ConnectionError:  # the client went away while sending
            return
        payload = json.dumps(canonical).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]

        sent = False

        async def replay() -> Message:  # the new body once, then the client's own messages (its disconnect)
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, refused as soon as its declared or received size passes the limit."""
        limit = self.max_payload_bytes
        too_large = RequestError(413, f"payload over the limit of {limit} bytes (nxtp serve --max-payload-mb)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client disconnected")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise too_large
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body:
            raise RequestError(
                400,
                "empty body: send an image as the raw body, as multipart field 'image', or as "
                "base64 in JSON field 'image'",
                "image",
            )
        return body

    async def canonical(self, scope: Scope, body: bytes) -> dict[str, Any]:
        """``{"image": base64, "filename", "topk", "min_prob"}`` from the query string and the body."""
        query: dict[str, Any] = {}
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if name in query:
                raise RequestError(400, f"{name}: given twice", name)
            query[name] = value
        if "image" in query:
            raise RequestError(400, "image: goes in the body, not the query string", "image")
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
        if content_type == "application/json":
            try:
                fields = json.loads(body)
            except ValueError as e:
                raise RequestError(400, f"body: not valid JSON ({e})") from None
            if not isinstance(fields, dict):
                raise RequestError(400, "body: a JSON object with the image as base64 in field 'image'")
            if "image" not in fields:
                raise RequestError(400, "image: missing (the image file's bytes as base64)", "image")
            data, text = None, False
        elif content_type == "multipart/form-data":
            fields, data = await _form_fields(scope, body)
            if not data:
                raise RequestError(
                    400,
                    f"image: {'missing' if data is None else 'an empty file'} (a multipart file "
                    f"upload in field 'image')",
                    "image",
                )
            text = True
        else:  # the image file itself, whatever the client called it (curl --data-binary says form-urlencoded)
            fields, data, text = {}, body, True
        twice = sorted(set(query) & set(fields))
        if twice:
            raise RequestError(400, f"{twice[0]}: given twice, in the query string and in the body", twice[0])
        options = parse_fields(query, self.defaults, text=True)
        options.update(parse_fields(fields, {}, text=text))
        if data is not None:
            options["image"] = data
        options["image"] = base64.b64encode(options["image"]).decode()  # LitServe's queue carries JSON values
        return options


@dataclass
class Prepared:
    """One request's pixels and options, ready for the batch."""

    pixels: Any  # Tensor [3, H, W]
    topk: int
    min_prob: float
    filename: str | None
    threshold: str | None = None
    locate: bool = False
    size: tuple[int, int] | None = None  # the upright image's (width, height): where its locations are measured


class RecognizerAPI(ls.LitAPI):
    """LitServe's side: loads the checkpoint in each worker and labels the batches LitServe collects.

    A request whose image cannot be read gets its own error and leaves the rest of its batch alone (LitServe would
    fail every request of a batch for an exception raised in ``decode_request``, so errors travel as values).
    Requests with different ``topk`` are labelled in one group per value, and ``min_prob`` only filters the ranked
    labels (as in ``sampling.rank_labels``): each answer is what the request alone would get.
    """

    def __init__(
        self,
        checkpoint: str,
        options: InferenceOptions | None = None,
        trust: bool = False,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``options.batch_size`` is LitServe's ``max_batch_size``, ``kwargs`` go to ``LitAPI`` (``batch_timeout``);
        each worker loads the model on the device LitServe gives it (``cli.serve.accelerator_devices``)."""
        self.options = options or InferenceOptions()
        super().__init__(max_batch_size=self.options.batch_size, **kwargs)
        self.checkpoint, self.trust, self.threads = checkpoint, trust, threads

    def setup(self, device: str) -> None:
        import torch
        from PIL import Image

        if self.threads:
            torch.set_num_threads(self.threads)
        from .attention_maps import patch_grid

        self.recognizer = self.options.load(self.checkpoint, trust=self.trust, device=device)
        try:
            patch_grid(self.recognizer.model)
            self.cannot_locate = None
        except ValueError as e:
            self.cannot_locate = str(e)
        self.label([self.recognizer.preprocess(Image.new("RGB", (64, 64)))], topk=1)  # warm up before /health

    def keep(self, pair: tuple[str, float], item: Prepared) -> bool:
        """Whether a ranked label passes the request's ``min_prob`` and ``threshold``."""
        label, p = pair
        if item.threshold == "auto" and p < self.recognizer.calibration.threshold_for(label):
            return False
        return p >= item.min_prob

    def label(self, pixels: list, topk: int) -> list[list[tuple[str, float]]]:
        with autocast(self.recognizer.device, self.options.precision):
            return self.recognizer.label(
                pixels, topk=topk, batch_size=len(pixels), sampler=self.options.sampler, beams=self.options.beams
            )

    # No annotation on ``request`` nor on encode_response's result: LitServe builds the FastAPI endpoint from them
    # (unannotated: the body arrives as the JSON dict that ``RequestReader`` wrote).
    def decode_request(self, request):  # -> Prepared | RequestError
        from datamodules.images import ImageError

        try:
            image = self.recognizer.read(base64.b64decode(request["image"]))
            pixels = self.recognizer.model.eval_transform(image)
        except ImageError as e:
            if isinstance(e.__cause__, Exception) and type(e.__cause__).__name__ == "UnidentifiedImageError":
                return RequestError(422, "image: not an image file that PIL can read (JPEG, PNG, WebP, ...)", "image")
            return RequestError(422, f"image: {e}", "image")
        except Exception as e:  # never let a request's data stop the worker
            return RequestError(422, f"image: cannot be read ({type(e).__name__}: {e})", "image")
        if request.get("locate") and self.cannot_locate:
            return RequestError(400, f"locate: {self.cannot_locate}", "locate")
        threshold = request.get("threshold")
        if threshold == "auto" and self.recognizer.calibration is None:
            return RequestError(400, "threshold: 'auto' needs a calibrated model (nxtp calibrate)", "threshold")
        return Prepared(
            pixels,
            request["topk"],
            request["min_prob"],
            request.get("filename"),
            threshold,
            bool(request.get("locate", False)),
            image.size,
        )

    def predict(self, batch: list[Prepared | RequestError] | Prepared | RequestError) -> list | Any:
        from .attention_maps import capture_prefix

        single = not isinstance(batch, list)  # LitServe's loop without batching (max_batch_size 1) passes one
        items = [batch] if single else batch
        labels: dict[int, list[tuple[str, float]]] = {}
        groups: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if isinstance(item, Prepared):
                groups[item.topk].append(i)
        for topk, indices in groups.items():
            located = any(items[i].locate for i in indices)
            capture = located and self.options.sampler == "one-shot"  # the pass that locating can reuse
            with capture_prefix(self.recognizer.model) if capture else contextlib.nullcontext() as prefix:
                found = self.label([items[i].pixels for i in indices], topk)
            kept = [[x for x in f if self.keep(x, items[i])] for i, f in zip(indices, found)]
            if located:  # only the labels kept
                import torch

                pixels = torch.stack([items[i].pixels for i in indices]).to(self.recognizer.device)
                sizes = [items[i].size for i in indices]
                asked = [k if items[i].locate else [] for i, k in zip(indices, kept)]
                rule = self.options.locate_rule()
                where = self.recognizer.with_locations(pixels, sizes, asked, prefix=prefix, **rule)
                kept = [w if items[i].locate else k for i, k, w in zip(indices, kept, where)]
            labels.update(zip(indices, kept))
        outputs = [(item, labels.get(i), len(items)) for i, item in enumerate(items)]
        return outputs[0] if single else outputs

    def encode_response(self, output):  # -> JSONResponse
        item, labels, batch_size = output
        if isinstance(item, RequestError):
            return item.response(batch_size)
        entry = Labelled(item.filename, labels).to_json()
        return JSONResponse(entry, headers={"X-Batch-Size": str(batch_size)})


def describe(checkpoint: str | Path, trust: bool = False, decode: str | None = None) -> dict[str, Any]:
    """What ``/info`` names: the checkpoint, the vision tower, the decoder, the tokenizer, the image preprocessing
    (the model's, with ``decode`` where ``--decode`` overrides it) and the identity of the
    weights its label calibration was fitted on (None: uncalibrated), read from the
    model's config alone (``checkpoint.read_config``: a ``.ckpt`` is read as ``Recognizer.from_checkpoint``
    reads it, so an untrusted one is refused here, before any worker starts)."""
    from .checkpoint import read_calibration, read_config

    path = Path(checkpoint)
    config = read_config(path, trust=trust)
    tokenizer = str(Path(config.tokenizer).resolve()) if Path(config.tokenizer).exists() else config.tokenizer
    if not path.is_dir() and not Path(config.tokenizer).exists():  # the checkpoint's own copy is used instead
        tokenizer += " (not on this machine: the copy stored in the checkpoint is used)"
    layers = config.decoder.config or {}
    calibration = read_calibration(path, trust=trust)  # checked against the weights when a worker loads them
    return {
        "checkpoint": str(path.resolve()),
        "model": "NXTP",
        "vision": config.vision.model_name,
        "decoder": config.decoder.name_or_path or layers.get("model_type", "llama"),
        "decoder_layers": config.decoder.num_blocks or layers.get("num_hidden_layers"),
        "decoder_hidden_size": layers.get("hidden_size"),
        "tokenizer": tokenizer,
        "preprocessing": asdict(config.preprocessing) | ({"decode": decode} if decode else {}),
        "calibration": None if calibration is None else calibration.model_id,
    }
