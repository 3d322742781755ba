"""`nxtp serve` as a real process on 127.0.0.1, talked to over real HTTP: answers equal `nxtp label`'s on the same
images and checkpoint, concurrent requests are batched (with mixed options and a bad image in the batch), bad
requests get a 4xx JSON error naming the problem, a request that waits too long gets 504, SIGTERM stops it all.

Every process and request is bounded in time: the server's process group is killed on a deadline.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import NXTP_CLI, OFFICIAL, ROOT, group_alive, popen, tiny_nxtp
from PIL import Image, ImageOps

from lightning_modules.cli.label import label_main
from lightning_modules.cli.serve import accelerator_devices, serve_main
from lightning_modules.serving import MAX_TOPK, RequestError, parse_fields

STARTUP_S = 300  # a loaded 2-core machine needs 1-2 minutes to import torch twice and load the model
REQUEST_S = 60
QUEUE_TIMEOUT_S = 30  # the server's --timeout (its default): no request waits this long below, even on a slow machine


# request parsing, without a server -----------------------------------------------------------------------------


def test_fields_are_checked_and_named():
    assert parse_fields({"topk": "5", "min_prob": "0.5"}, {"topk": 10}, text=True) == {"topk": 5, "min_prob": 0.5}
    assert parse_fields({}, {"topk": 10, "min_prob": 0.0}, text=False) == {"topk": 10, "min_prob": 0.0}
    for fields, text, field in [
        ({"topk": 0}, False, "topk"),
        ({"topk": MAX_TOPK + 1}, False, "topk"),
        ({"topk": True}, False, "topk"),
        ({"topk": 2.5}, False, "topk"),
        ({"topk": "x"}, True, "topk"),
        ({"min_prob": -0.1}, False, "min_prob"),
        ({"min_prob": "nan"}, True, "min_prob"),
        ({"vocab": []}, False, "vocab"),
        ({"image": "not base64!"}, False, "image"),
    ]:
        with pytest.raises(RequestError) as e:
            parse_fields(fields, {}, text)
        assert e.value.status == 400 and e.value.field == field and field in str(e.value)


def test_device_names():
    assert accelerator_devices("cpu") == ("cpu", 1)
    assert accelerator_devices("cuda") == ("cuda", "auto")
    assert accelerator_devices("cuda:0,1") == ("cuda", [0, 1])


def test_an_untrusted_checkpoint_is_refused_before_anything_starts(tmp_path, capsys):
    torch.save({"hyper_parameters": {"tokenizer": Path("elsewhere")}}, tmp_path / "odd.ckpt")  # pickles a PosixPath
    assert serve_main(["--checkpoint", str(tmp_path / "odd.ckpt")]) == 2
    assert "refusing to load checkpoint" in capsys.readouterr().err
    assert serve_main(["--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_option_defaults_obey_the_request_rules(capsys):
    for flag, value, words in (("--topk", "0", "--topk: an integer from 1 to"), ("--min-prob", "2", "--min-prob: a")):
        with pytest.raises(SystemExit) as end:
            serve_main(["--checkpoint", "model", flag, value])
        assert end.value.code == 2 and words in capsys.readouterr().err


# the server ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Real HTTP to the server on 127.0.0.1: (status, headers, JSON body) for each request."""

    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, response.headers, json.loads(data) if data[:1] in (b"{", b"[") else data
        finally:
            conn.close()

    def raw(self, data: bytes, query: str = ""):
        return self.request("POST", f"/predict{query}", data, {"Content-Type": "application/octet-stream"})

    def multipart(self, data: bytes, filename: str, **fields):
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def json(self, fields: dict):
        return self.request("POST", "/predict", json.dumps(fields).encode(), {"Content-Type": "application/json"})


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def inference_worker(pid: int) -> int:
    """The pid of the server's inference worker (LitServe spawns it: ``spawn_main`` in its command line)."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError("no inference worker found")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model folder, test images (PNG, JPEG, EXIF-rotated JPEG, transparent PNG), and the server."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny_nxtp(seed=5)
    with torch.no_grad():  # labels that end, as in a trained model
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 4
    model.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    Image.open(OFFICIAL / "image_0_300x200.png").save(images / "a.png")
    Image.open(OFFICIAL / "image_1_224x224.png").convert("RGB").save(images / "b.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    (images / "c.jpg").write_bytes(
        encode(ImageOps.mirror(Image.open(OFFICIAL / "image_2_180x320.png").convert("RGB")), "JPEG", exif=exif)
    )
    rgba = Image.open(OFFICIAL / "image_0_300x200.png").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(images / "d.png")
    port = free_port()
    cmd = NXTP_CLI + [
        "serve",
        "--checkpoint",
        str(root / "model"),
        "--port",
        str(port),
        "--max-batch-size",
        "8",
        "--batch-timeout",
        "0.3",
        "--topk",
        "4",
        "--max-payload-mb",
        "1",
        "--max-image-pixels",
        "200000",
        "--timeout",
        str(QUEUE_TIMEOUT_S),
        "--log-level",
        "warning",
    ]
    log = (root / "server.log").open("w")
    proc = popen(
        cmd,
        {**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = Client(port)
    deadline = time.time() + STARTUP_S
    try:
        while True:
            assert proc.poll() is None, f"nxtp serve ended: {(root / 'server.log').read_text()[-3000:]}"
            assert time.time() < deadline, f"no /health in {STARTUP_S} s: {(root / 'server.log').read_text()[-3000:]}"
            try:
                if client.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield root, images, client, proc
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def truth(root: Path, images: list[Path], topk: int, min_prob: float = 0.0) -> dict[str, list[dict]]:
    """What `nxtp label` answers for these images: {file name: labels}."""
    out = root / f"truth-{topk}-{min_prob}.jsonl"
    code = label_main(
        [
            "--checkpoint",
            str(root / "model"),
            "--topk",
            str(topk),
            "--min-prob",
            str(min_prob),
            "--workers",
            "0",
            "--output",
            str(out),
        ]
        + [str(p) for p in images]
    )
    assert code == 0
    return {Path(e["image"]).name: e["labels"] for e in map(json.loads, out.read_text().splitlines())}


def assert_same(answer: list[dict], expected: list[dict]) -> None:
    assert [x["label"] for x in answer] == [x["label"] for x in expected]
    assert [x["prob"] for x in answer] == pytest.approx([x["prob"] for x in expected], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_answers_equal_nxtp_label_in_every_request_form(setup):
    root, images, client, _ = setup
    paths = sorted(images.iterdir())
    expected, expected_default = truth(root, paths, topk=3), truth(root, paths, topk=4)
    for path in paths:
        data = path.read_bytes()
        status, headers, raw = client.raw(data, "?topk=3")
        assert status == 200 and "image" not in raw, raw  # a raw body has no name
        assert_same(raw["labels"], expected[path.name])
        status, _, form = client.multipart(data, path.name, topk="3")
        assert status == 200 and form["image"] == path.name
        assert_same(form["labels"], expected[path.name])
        status, _, body = client.json({"image": base64.b64encode(data).decode(), "topk": 3, "filename": "x.jpg"})
        assert status == 200 and body["image"] == "x.jpg"
        assert_same(body["labels"], expected[path.name])
        status, _, default = client.raw(data)  # the server's --topk 4
        assert status == 200
        assert_same(default["labels"], expected_default[path.name])


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(setup):
    root, images, client, _ = setup
    paths = sorted(images.iterdir())
    probs = sorted(x["prob"] for labels in truth(root, paths, topk=5).values() for x in labels if x["prob"] > 0)
    # a min_prob that drops some labels and keeps others, far from any label's probability (batching moves
    # probabilities by float rounding): the middle of the widest gap in the middle half
    middle = probs[len(probs) // 4 : 3 * len(probs) // 4 + 1]
    low, high = max(zip(middle, middle[1:]), key=lambda pair: pair[1] / pair[0])
    cut = (low * high) ** 0.5
    options = [(3, 0.0), (5, 0.0), (5, cut), (1, 0.0)]
    expected = {(k, p): truth(root, paths, k, p) for k, p in options}
    jobs = [(path, k, p) for k, p in options for path in paths] + [(None, 3, 0.0)] * 2  # 2 broken images too

    def send(job):
        path, k, p = job
        data = path.read_bytes() if path else b"\x89PNG\r\n\x1a\n broken"
        return job, client.raw(data, f"?topk={k}&min_prob={p}")

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    assert all(status in (200, 422) for _, (status, _, _) in answers), [
        (job, status, body) for job, (status, _, body) in answers if status not in (200, 422)
    ]
    sizes = [int(headers["X-Batch-Size"]) for _, (_, headers, _) in answers]
    assert max(sizes) > 1, sizes
    for (path, k, p), (status, _, body) in answers:
        if path is None:
            assert status == 422 and body["field"] == "image", body
        else:
            assert status == 200, body
            assert_same(body["labels"], expected[(k, p)][path.name])


@pytest.mark.slow
def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(setup):
    root, images, client, _ = setup
    good = (images / "a.png").read_bytes()
    big = encode(Image.new("RGB", (640, 480), "red"), "PNG")  # 307,200 pixels, over --max-image-pixels 200000
    cases = {
        "not an image": (client.raw(b"hello, I am text"), 422, "image", "not an image"),
        "truncated": (client.raw(good[: len(good) // 2]), 422, "image", "corrupt image"),
        "too many pixels": (client.raw(big), 422, "image", "640x480 = 307200 pixels"),
        "empty body": (client.raw(b""), 400, "image", "empty body"),
        "empty upload": (client.multipart(b"", "e.png"), 400, "image", "empty file"),
        "unknown field": (
            client.json({"image": base64.b64encode(good).decode(), "colour": "red"}),
            400,
            "colour",
            "unknown field 'colour'",
        ),
        "unknown query": (client.raw(good, "?k=3"), 400, "k", "unknown field 'k'"),
        "topk 0": (client.raw(good, "?topk=0"), 400, "topk", "topk"),
        "topk too large": (client.multipart(good, "a.png", topk=str(MAX_TOPK + 1)), 400, "topk", "topk"),
        "topk not a number": (
            client.json({"image": base64.b64encode(good).decode(), "topk": "3"}),
            400,
            "topk",
            "topk",
        ),
        "min_prob above 1": (client.raw(good, "?min_prob=1.5"), 400, "min_prob", "min_prob"),
        "given twice": (client.raw(good, "?topk=3&topk=4"), 400, "topk", "given twice"),
        "bad base64": (client.json({"image": "@@@"}), 400, "image", "base64"),
        "no image in JSON": (client.json({"topk": 3}), 400, "image", "missing"),
        "invalid JSON": (
            client.request("POST", "/predict", b"{", {"Content-Type": "application/json"}),
            400,
            None,
            "not valid JSON",
        ),
        "over the payload limit": (client.raw(good + bytes(1 << 20)), 413, None, "payload over the limit"),
    }
    for name, ((status, headers, body), want_status, field, words) in cases.items():
        assert status == want_status, (name, status, body)
        assert headers["Content-Type"] == "application/json" and body["field"] == field, (name, body)
        assert words in body["error"], (name, body)
    # a body that announces more than the limit is refused before it is sent
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=REQUEST_S)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(10 << 30))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "payload over the limit" in json.loads(response.read())["error"]
    conn.close()
    assert client.request("GET", "/health")[0] == 200
    status, _, body = client.raw(good)
    assert status == 200 and body["labels"]


@pytest.mark.slow
def test_info_names_the_model_tokenizer_and_checkpoint(setup):
    root, _, client, _ = setup
    status, _, info = client.request("GET", "/info")
    model = info["model"]
    assert status == 200 and model["checkpoint"] == str((root / "model").resolve())
    assert model["vision"] == "nxtp-tiny-vit" and model["tokenizer"] == str((root / "model" / "tokenizer").resolve())
    assert model["max_batch_size"] == 8 and model["defaults"]["topk"] == 4
    assert model["preprocessing"]["decode"] == "full"  # the model's (the reference's): no --decode given


@pytest.mark.slow
def test_a_request_that_waits_too_long_gets_504(setup):
    _, images, client, proc = setup
    worker = inference_worker(proc.pid)
    os.kill(worker, signal.SIGSTOP)  # a worker busy for longer than --timeout
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.raw, (images / "a.png").read_bytes())
            time.sleep(QUEUE_TIMEOUT_S + 1.5)
            os.kill(worker, signal.SIGCONT)
            status, _, body = waiting.result(timeout=REQUEST_S)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert status == 504 and "timed out" in body["error"] and "--timeout" in body["error"], body
    status, _, body = client.raw((images / "a.png").read_bytes())
    assert status == 200 and body["labels"]


@pytest.mark.slow
def test_sigterm_stops_the_server_and_all_its_processes(setup):
    """Last in this file: it ends the module's server."""
    _, _, _, proc = setup
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    deadline = time.time() + 30
    while group_alive(proc.pid) and time.time() < deadline:  # workers, HTTP servers, LitServe's manager
        time.sleep(0.2)
    assert not group_alive(proc.pid)
