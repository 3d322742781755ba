"""Export a trained recognizer for serving: pickle-free safetensors, or ONNX graphs and their sampler.

The ONNX export splits one-shot sampling (``sampling``) into two graphs whose key/value cache is passed
explicitly, so that any ONNX runtime can serve the model without transformers' cache classes:

* ``prefix.onnx``: ``pixels`` [B, 3, H, W] -> ``first_logits`` [B, V] at the last prompt position, and the
  prefix cache ``past_key_{i}`` / ``past_value_{i}`` [B, heads, L, head_dim] of every decoder layer i.
  The prompt ids are constants of the graph.
* ``step.onnx``: ``token_ids`` [N, 1], ``position`` [N, 1] and the cache [N, heads, T, head_dim] ->
  ``logits`` [N, V] and ``present_key_{i}`` / ``present_value_{i}``: the cache with the token appended.

The decoder layers are written out from the modules' own weights (LLaMA-type blocks: RMSNorm, rotary
attention with grouped key/value heads, gated MLP) rather than traced through transformers' cache
objects, which the exporters do not follow. The graphs are exported in float32.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .masking import prefix_attention
from .nxtp import NXTP
from .sampling import one_shot, rank_images

ExportFormat = Literal["safetensors", "onnx"]
ONNX_DECODER_TYPES = ("llama",)  # the blocks ``_Decoder`` writes out (SmolLM2 and LLaMA-2/3 are ``llama``)
EXTERNAL_DATA_BYTES = 1_500_000_000  # above this a graph keeps its weights in a side file
META_FILE = "onnx_meta.json"


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Decoder(nn.Module):
    """The decoder stack over explicit key/value tensors; both graphs share it."""

    def __init__(self, model: NXTP) -> None:
        super().__init__()
        base = model.decoder.get_decoder()
        self.layers = base.layers
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.decoder.get_output_embeddings()

    def forward(
        self, hidden: Tensor, positions: Tensor, past: list[tuple[Tensor, Tensor]] | None, mask: Tensor | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Logits at the last position [B, V] and every layer's full cache (past + new positions).

        ``mask`` is an additive [1, 1, S, S] mask over the new positions only; ``past`` positions are
        always visible (the labels see the whole prefix).
        """
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            presents.append((k, v))
            groups = attn.num_key_value_groups
            kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
            vv = v.repeat_interleave(groups, dim=1) if groups > 1 else v
            scores = torch.matmul(q, kk.transpose(-1, -2)) * attn.scaling
            if mask is not None:
                scores = scores + mask
            out = torch.matmul(scores.softmax(-1), vv)
            out = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.lm_head(self.norm(hidden[:, -1]))
        return logits, presents


class PrefixGraph(nn.Module):
    """Image + prompt -> first-token logits and the prefix cache."""

    def __init__(self, model: NXTP) -> None:
        super().__init__()
        self.model = model
        self.decoder = _Decoder(model)
        prompt = torch.tensor(model.sequences.prompt_ids(model.prompt), dtype=torch.long)
        self.register_buffer("prompt", prompt, persistent=False)
        allowed = prefix_attention(model.n_image_tokens, len(prompt))
        self.register_buffer("mask", torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")), persistent=False)

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        image = self.model.embed_images(pixels)
        text = self.model.embed_text(self.prompt).to(image.dtype)
        embeds = torch.cat([image, text[None].expand(image.shape[0], -1, -1)], dim=1)
        positions = torch.arange(embeds.shape[1], device=pixels.device)[None]
        logits, presents = self.decoder(embeds, positions, None, self.mask)
        return (logits, *[t for kv in presents for t in kv])


class StepGraph(nn.Module):
    """One decoding step of N branches over their explicit cache."""

    def __init__(self, model: NXTP) -> None:
        super().__init__()
        self.model = model
        self.decoder = _Decoder(model)

    def forward(self, token_ids: Tensor, position: Tensor, *past_flat: Tensor) -> tuple[Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.decoder(self.model.embed_text(token_ids), position, past, None)
        return (logits, *[t for kv in presents for t in kv])


def _kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
    large: bool,
) -> None:
    # nn.MultiheadAttention's fused inference kernel (used by the vision tower) has no ONNX export.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            # The vision tower's shape checks are constant for a fixed image size; their warnings are noise.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if large:
        import onnx

        graph = onnx.load(str(path))  # also reads weights the exporter may already have put aside
        onnx.save_model(
            graph,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )


def _load_model(checkpoint_or_model: NXTP | str | Path, trust: bool = False) -> NXTP:
    if isinstance(checkpoint_or_model, NXTP):
        return checkpoint_or_model
    from .recognizer import Recognizer

    return Recognizer.from_checkpoint(checkpoint_or_model, trust=trust).model


@torch.no_grad()
def export(
    checkpoint_or_model: NXTP | str | Path,
    out_dir: str | Path,
    format: ExportFormat = "safetensors",
    opset: int = 17,
    trust: bool = False,
) -> Path:
    """Write a model (or a ``.ckpt`` / ``save_pretrained`` folder) to ``out_dir`` in ``format``; return it.

    A ``.ckpt`` is read safely (see ``checkpoint_io.load_checkpoint``) unless ``trust`` is set.

    ``safetensors`` writes ``save_pretrained``'s folder. ``onnx`` writes the same folder (config and
    tokenizer are needed to serve) plus ``prefix.onnx``, ``step.onnx`` and ``onnx_meta.json``.
    """
    if format not in ("safetensors", "onnx"):
        raise ValueError(f"unknown export format {format!r}: use 'safetensors' or 'onnx'")
    if format == "onnx" and importlib.util.find_spec("onnx") is None:  # fail before loading anything
        raise ImportError("ONNX export needs the onnx package: pip install 'nxtp-lightning[export]'")
    model = _load_model(checkpoint_or_model, trust)
    decoder_type = model.decoder.config.model_type
    if format == "onnx" and decoder_type not in ONNX_DECODER_TYPES:
        raise ValueError(
            f"ONNX export writes {', '.join(ONNX_DECODER_TYPES)} decoder blocks only, not "
            f"{decoder_type!r} (model.decoder); --format safetensors exports any decoder"
        )
    out = model.save_pretrained(out_dir)
    if format == "safetensors":
        return out

    # Export a float32 CPU copy: ONNX runtimes lack half-precision kernels on CPU, and the caller's model
    # must not change.
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params) or model.training:
        model = copy.deepcopy(model).float().cpu()
    model = model.eval()
    large = sum(p.numel() * 4 for p in params) > EXTERNAL_DATA_BYTES
    n_layers = len(model.decoder.get_decoder().layers)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.zeros(2, 3, *size)

    prefix = PrefixGraph(model).eval()
    past_names = _kv_names("past", n_layers)
    prefix_out = prefix(pixels)
    _export_graph(
        prefix,
        (pixels,),
        out / "prefix.onnx",
        ["pixels"],
        ["first_logits", *past_names],
        {"pixels": {0: "batch"}, "first_logits": {0: "batch"}, **{n: {0: "batch"} for n in past_names}},
        opset,
        large,
    )

    cache_axes = {0: "branches", 2: "cache_length"}
    step_args = (
        torch.zeros(2, 1, dtype=torch.long),
        torch.full((2, 1), prefix_out[1].shape[2], dtype=torch.long),
        *prefix_out[1:],
    )
    present_names = _kv_names("present", n_layers)
    _export_graph(
        StepGraph(model).eval(),
        step_args,
        out / "step.onnx",
        ["token_ids", "position", *past_names],
        ["logits", *present_names],
        {
            "token_ids": {0: "branches"},
            "position": {0: "branches"},
            "logits": {0: "branches"},
            **{n: cache_axes for n in past_names},
            **{n: {0: "branches", 2: "new_length"} for n in present_names},
        },
        opset,
        large,
    )

    seqs = model.sequences
    meta = dict(
        n_layers=n_layers,
        prefix_length=int(prefix_out[1].shape[2]),
        delimiter_id=seqs.delimiter_id,
        eos_id=seqs.eos_id,
        delimiter=seqs.delimiter,
        reference_compat=model.reference_compat,
    )
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def onnx_recognize(
    out_dir: str | Path,
    pixels: np.ndarray,
    topk: int = 10,
    min_prob: float = 0.0,
    max_label_tokens: int = 19,
    providers: list[str] | None = None,
) -> list[list[tuple[str, float]]]:
    """``sampling.recognize`` on an ONNX export: the graphs run in onnxruntime (no torch model), the decoding loop
    is ``sampling.one_shot``.

    ``pixels`` are preprocessed images [B, 3, H, W] (float32). Returns ``(label, probability)`` pairs sorted
    by probability, one list per image.
    """
    import onnxruntime as ort
    from transformers import AutoTokenizer

    out = Path(out_dir)
    meta = json.loads((out / META_FILE).read_text())
    providers = providers or ["CPUExecutionProvider"]
    prefix = ort.InferenceSession(str(out / "prefix.onnx"), providers=providers)
    step_graph = ort.InferenceSession(str(out / "step.onnx"), providers=providers)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    past_names = _kv_names("past", meta["n_layers"])

    first_logits, *cache = prefix.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
    length = cache[0].shape[2]
    cache = [np.repeat(c, topk, axis=0) for c in cache]  # branch b*k + j continues image b

    def step(tokens: Tensor, keep: Tensor | None, offset: int) -> Tensor:
        nonlocal cache
        if keep is not None:
            cache = [c[keep.numpy()] for c in cache]
        feed = {
            "token_ids": tokens[:, None].numpy().astype(np.int64),
            "position": np.full((len(tokens), 1), length + offset - 1, dtype=np.int64),
            **dict(zip(past_names, cache)),
        }
        logits, *cache = step_graph.run(None, feed)
        return torch.from_numpy(logits).float().softmax(-1)

    compat = meta["reference_compat"]
    branches = one_shot(
        torch.from_numpy(first_logits).float().softmax(-1),
        step,
        topk,
        [meta["delimiter_id"], meta["eos_id"]],
        compat,
        max_label_tokens,
    )
    return rank_images(branches, tokenizer.decode, min_prob, compat, meta["delimiter"], meta["delimiter_id"])
