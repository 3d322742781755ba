"""Import the official NXTP checkpoints (``ckpt_epoch_03_iter_*.pth``) into the project's own format.

A released checkpoint holds only the trained tensors under ``ckpt["model"]`` with a ``module.`` prefix:
the last CLIP blocks, ``ln_post``, the new projection, and the whole truncated decoder in Meta's LLaMA
layout. The frozen CLIP parts come from the OpenAI CLIP weights. Dimensions are read from tensor shapes;
head counts and the norm epsilon cannot be, so they are arguments.

    nxtp import-official --checkpoint ckpt.pth --clip openai --tokenizer meta-llama/Llama-2-7b-hf --out nxtp-g3m
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from .decoder import DecoderConfig
from .nxtp import NXTP, NXTPConfig, Preprocessing
from .vision import VisionConfig

DECODER_KEYS = {  # Meta LLaMA name -> transformers LlamaForCausalLM name
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


# The reference's preprocessing, in training and evaluation alike (OpenAI CLIP's ``_transform``): every pixel decoded,
# the short side resized to the input size (bicubic, antialiased), the centre crop, OpenAI's normalisation.
REFERENCE_PREPROCESSING = Preprocessing(
    decode="full",
    interpolation="bicubic",
    resize_mode="shortest",
    mean=[0.48145466, 0.4578275, 0.40821073],
    std=[0.26862954, 0.26130258, 0.27577711],
)


def meta_to_hf_rotary(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a Meta-layout ``wq``/``wk`` for transformers' rotate-half RoPE.

    Meta rotates adjacent pairs (2i, 2i+1) of each head; transformers rotates (i, i + head_dim/2).
    """
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (what OpenAI ships as ``ViT-L-14.pt``) rather than a state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:  # TorchScript zips hold code/ and constants.pkl; torch.save ones do not
        return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())


def read_clip_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an OpenAI CLIP file: a TorchScript archive (OpenAI's own) or a plain state dict.

    A TorchScript archive is read with ``torch.jit.load`` on the CPU for its state dict only; its code is never
    called. A state dict is read with ``weights_only=True`` (no pickled code runs).
    """
    if is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is the only reader of OpenAI's archive
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def load_clip_visual(clip: str) -> dict[str, Tensor]:
    """The OpenAI CLIP vision weights with ``visual.`` stripped, from ``openai`` (via open_clip) or a file.

    The file is OpenAI's TorchScript archive (e.g. ``ViT-L-14.pt``) or a state dict with OpenAI's key names.
    """
    if clip == "openai":
        import open_clip

        model = open_clip.create_model("ViT-L-14-quickgelu", pretrained="openai")
        return {k: v for k, v in model.visual.state_dict().items()}
    if not Path(clip).is_file():
        raise FileNotFoundError(f"--clip {clip}: no such file (give 'openai' or an OpenAI CLIP .pt file)")
    state = read_clip_state(clip)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"--clip {clip}: no 'visual.*' keys; expected an OpenAI CLIP file (TorchScript or state dict)")
    return visual


def _count(keys, pattern: str) -> int:
    return len({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def convert(
    ckpt: dict[str, Tensor],
    clip_visual: dict[str, Tensor],
    vision_heads: int | None = None,
    decoder_heads: int | None = None,
    norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
):
    """Turn the official tensors into (VisionConfig, DecoderConfig, NXTP state dict)."""
    ckpt = {k.removeprefix("module."): v.detach().float() for k, v in ckpt.items()}
    vision = {k.removeprefix("vision_encoder."): v for k, v in ckpt.items() if k.startswith("vision_encoder.")}
    decoder = {k.removeprefix("language_decoder."): v for k, v in ckpt.items() if k.startswith("language_decoder.")}
    unexpected = sorted(k for k in ckpt if not k.startswith(("vision_encoder.", "language_decoder.")))

    visual = {k: v.float() for k, v in clip_visual.items() if k != "proj"}
    projection = vision.pop("proj.weight", None)
    visual.update(vision)  # the checkpoint's trained blocks and ln_post override CLIP's

    width, _, patch, _ = visual["conv1.weight"].shape
    grid = int(round((visual["positional_embedding"].shape[0] - 1) ** 0.5))
    vision_layers = _count(visual, r"transformer\.resblocks\.(\d+)\.")
    mlp = visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    heads = vision_heads or width // 64
    vision_cfg = VisionConfig(
        model_name="nxtp-imported-vit",
        config={
            "embed_dim": width,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": patch * grid,
                "patch_size": patch,
                "width": width,
                "layers": vision_layers,
                "head_width": width // heads,
                "mlp_ratio": mlp / width,
            },
            "text_cfg": {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1},  # unused
        },
    )

    vocab, dim = decoder["tok_embeddings.weight"].shape
    n_layers = _count(decoder, r"layers\.(\d+)\.")
    n_heads = decoder_heads or max(1, dim // 128)
    hidden = decoder["layers.0.feed_forward.w1.weight"].shape[0]
    decoder_cfg = DecoderConfig(
        config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": dim,
            "intermediate_size": hidden,
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_heads,
            "rms_norm_eps": norm_eps,
            "rope_theta": rope_theta,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    )

    state = {f"visual.{k}": v for k, v in visual.items()}
    if projection is not None:
        state["projection.weight"] = projection
    for key, value in decoder.items():
        layer = re.match(r"layers\.(\d+)\.(.+)", key)
        name = DECODER_KEYS.get(layer.group(2) if layer else key)
        if name is None:
            unexpected.append(f"language_decoder.{key}")
            continue
        if layer and layer.group(2) in ("attention.wq.weight", "attention.wk.weight"):
            value = meta_to_hf_rotary(value, n_heads)
        state[f"decoder.{'model.layers.' + layer.group(1) + '.' if layer else ''}{name}"] = value
    if unexpected:
        raise ValueError(f"unexpected checkpoint keys: {unexpected}")
    return vision_cfg, decoder_cfg, state


def import_official(
    checkpoint: str,
    clip: str,
    tokenizer: str,
    out: str,
    vision_heads: int | None = None,
    decoder_heads: int | None = None,
    norm_eps: float = 1e-5,
    reference_compat: bool = False,
) -> NXTP:
    """Build an ``NXTP`` from an official checkpoint and CLIP weights, write it to ``out`` and return it."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" not in ckpt:
        raise ValueError(f"{checkpoint}: no 'model' entry; expected an official NXTP checkpoint")
    vision_cfg, decoder_cfg, state = convert(
        ckpt["model"], load_clip_visual(clip), vision_heads, decoder_heads, norm_eps
    )
    config = NXTPConfig(
        vision_cfg, decoder_cfg, tokenizer, reference_compat=reference_compat, preprocessing=REFERENCE_PREPROCESSING
    )
    model = NXTP(config)
    rows = state["decoder.model.embed_tokens.weight"].shape[0]
    if len(model.tokenizer) != rows:
        raise ValueError(
            f"tokenizer {tokenizer} has {len(model.tokenizer)} tokens with <|image|> and <|empty|>; "
            f"the checkpoint's embeddings have {rows} rows"
        )
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or extra or mis_shaped:
        raise ValueError(
            f"cannot load the official checkpoint: missing keys {missing}, unexpected keys {extra}, "
            f"mis-shaped {mis_shaped}"
        )
    model.load_state_dict(state)
    model.save_pretrained(out)
    return model.eval()
