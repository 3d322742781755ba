"""Export a trained recognizer for serving: pickle-free safetensors, or ONNX graphs with a numpy sampler.

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

import argparse
import copy
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .masking import prefix_attention
from .nxtp import NXTP
from .sampling import rank_images, split_branches

ExportFormat = Literal["safetensors", "onnx"]
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

    def forward(self, hidden: Tensor, positions: Tensor, past: list[tuple[Tensor, Tensor]] | None,
                mask: Tensor | None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
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
            if getattr(attn, "q_norm", None) is not None:  # Qwen3-type blocks normalise q and k per head
                q, k = attn.q_norm(q), attn.k_norm(k)
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
        self.register_buffer("mask", torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")),
                             persistent=False)

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


def _export_graph(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
                  axes: dict[str, dict[int, str]], opset: int, large: bool) -> None:
    # nn.MultiheadAttention's fused inference kernel (used by the vision tower) has no ONNX export.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            # The vision tower's shape checks are constant for a fixed image size; their warnings are noise.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if large:
        import onnx

        graph = onnx.load(str(path))  # also reads weights the exporter may already have put aside
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)


def _load_model(checkpoint_or_model: NXTP | str | Path, trust: bool = False) -> NXTP:
    if isinstance(checkpoint_or_model, NXTP):
        return checkpoint_or_model
    from .recognizer import Recognizer

    return Recognizer.from_checkpoint(checkpoint_or_model, trust=trust).model


@torch.no_grad()
def export(checkpoint_or_model: NXTP | str | Path, out_dir: str | Path, format: ExportFormat = "safetensors",
           opset: int = 17, trust: bool = False) -> Path:
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
    _export_graph(prefix, (pixels,), out / "prefix.onnx", ["pixels"], ["first_logits", *past_names],
                  {"pixels": {0: "batch"}, "first_logits": {0: "batch"}, **{n: {0: "batch"} for n in past_names}},
                  opset, large)

    cache_axes = {0: "branches", 2: "cache_length"}
    step_args = (torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), prefix_out[1].shape[2], dtype=torch.long),
                 *prefix_out[1:])
    present_names = _kv_names("present", n_layers)
    _export_graph(StepGraph(model).eval(), step_args, out / "step.onnx", ["token_ids", "position", *past_names],
                  ["logits", *present_names],
                  {"token_ids": {0: "branches"}, "position": {0: "branches"}, "logits": {0: "branches"},
                   **{n: cache_axes for n in past_names},
                   **{n: {0: "branches", 2: "new_length"} for n in present_names}},
                  opset, large)

    seqs = model.sequences
    meta = dict(n_layers=n_layers, prefix_length=int(prefix_out[1].shape[2]), delimiter_id=seqs.delimiter_id,
                eos_id=seqs.eos_id, delimiter=seqs.delimiter, reference_compat=model.reference_compat)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def onnx_recognize(out_dir: str | Path, pixels: np.ndarray, topk: int = 10, min_prob: float = 0.0,
                   max_label_tokens: int = 19, providers: list[str] | None = None) -> list[list[tuple[str, float]]]:
    """``sampling.recognize`` on an ONNX export with onnxruntime and numpy only (no torch model).

    ``pixels`` are preprocessed images [B, 3, H, W] (float32). Returns ``(label, probability)`` pairs sorted
    by probability, one list per image.
    """
    import onnxruntime as ort
    from transformers import AutoTokenizer

    out = Path(out_dir)
    meta = json.loads((out / META_FILE).read_text())
    providers = providers or ["CPUExecutionProvider"]
    prefix = ort.InferenceSession(str(out / "prefix.onnx"), providers=providers)
    step = ort.InferenceSession(str(out / "step.onnx"), providers=providers)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    past_names = _kv_names("past", meta["n_layers"])

    first_logits, *cache = prefix.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
    batch, length = first_logits.shape[0], cache[0].shape[2]
    probs = _softmax(first_logits)
    first_tokens = np.argsort(-probs, axis=-1, kind="stable")[:, :topk]  # [B, k], like torch.topk
    first_probs = np.take_along_axis(probs, first_tokens, -1)
    cache = [np.repeat(c, topk, axis=0) for c in cache]  # branch b*k + j continues image b

    compat = meta["reference_compat"]
    stop_ids = np.array([meta["delimiter_id"]] if compat else [meta["delimiter_id"], meta["eos_id"]])
    tokens = [first_tokens.reshape(-1)]
    token_probs = [first_probs.reshape(-1)]
    # Same stopping rule as ``decode_branches``: the reference ignores a delimiter drawn as first token.
    done = np.zeros(len(tokens[0]), dtype=bool) if compat else np.isin(tokens[0], stop_ids)
    for s in range(1, max_label_tokens):
        if done.all():
            break
        feed = {"token_ids": tokens[-1][:, None].astype(np.int64),
                "position": np.full((batch * topk, 1), length + s - 1, dtype=np.int64),
                **dict(zip(past_names, cache))}
        logits, *cache = step.run(None, feed)
        p = _softmax(logits)
        t = p.argmax(-1)
        tokens.append(t)
        token_probs.append(p[np.arange(len(t)), t])
        done |= np.isin(t, stop_ids)

    tok = np.stack(tokens, 1).reshape(batch, topk, -1).tolist()
    prob = np.stack(token_probs, 1).astype(np.float64).reshape(batch, topk, -1).tolist()
    branches = split_branches(tok, prob, set(stop_ids.tolist()))
    return rank_images(branches, tokenizer.decode, min_prob, compat, meta["delimiter"], meta["delimiter_id"])


def export_main(argv: list[str]) -> int:
    """``nxtp export --checkpoint CKPT --format safetensors|onnx --out DIR [--opset 17]``."""
    parser = argparse.ArgumentParser(prog="nxtp export", description="Export a model as safetensors or ONNX.")
    parser.add_argument("--checkpoint", required=True, help="a Lightning .ckpt or a save_pretrained folder")
    parser.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="let a .ckpt's pickle create any Python object, which can run code: only for files you "
                             "trust (by default only what the project's own checkpoints contain is loaded)")
    args = parser.parse_args(argv)
    from .checkpoint_io import UntrustedCheckpointError

    try:
        out = export(args.checkpoint, args.out, args.format, args.opset, trust=args.trust_checkpoint)
    except UntrustedCheckpointError as e:
        print(f"nxtp export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out}")
    return 0
