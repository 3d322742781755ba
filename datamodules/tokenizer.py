"""A small byte-level BPE tokenizer for the default, randomly initialised model.

The LLaMA-2 tokenizer (32k tokens) is only needed for parity with the reference;
a tiny decoder learns much faster with a vocabulary fitted to its captions.
The second step of ``make data``, after the shards (``datamodules.synthetic``)::

    python -m datamodules.tokenizer --data data/shapes [--vocab-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_modules.sequence import PROMPT

__all__ = ["PROMPT", "SPECIAL_TOKENS", "build_tokenizer", "train_caption_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")


def _with_extras(texts: Iterable[str], required_words: Sequence[str], repeats: int) -> Iterator[str]:
    yield from texts
    yield PROMPT
    # Repeating the required words gives their merges the highest counts, so
    # they become whole tokens even in a very small vocabulary.
    for _ in range(repeats):
        yield " ".join(required_words)


def train_caption_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 512,
    required_words: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (plus the prompt) and save it to ``out_dir``.

    The tokenizer adds no special tokens by itself (the model places ``<s>``);
    ``<unk>``, ``<s>`` and ``</s>`` have ids 0, 1 and 2. Every word in
    ``required_words`` is guaranteed to be a single token when preceded by a
    space (" star"), otherwise a ``ValueError`` is raised. The saved folder loads
    with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    required = list(dict.fromkeys(required_words))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_with_extras(texts, required, repeats=1000 if required else 0), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    split = [w for w in required if len(wrapped.encode(f" {w}", add_special_tokens=False)) != 1]
    if split:
        raise ValueError(f"vocab_size={vocab_size} is too small to keep these words whole: {split}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tokenizer(root: str | Path, vocab_size: int = 512) -> Path:
    """Train the caption tokenizer of a built synthetic dataset (``datamodules.synthetic.build_dataset``) on its
    training captions and label sequences, keeping every object kind one token; write it to ``root/tokenizer``
    (renamed into place when complete) and return that folder. A tokenizer of the same size is kept as is."""
    from datamodules.synthetic import KINDS, iter_split_metadata

    root = Path(root)
    manifest_path = root / "manifest.json"
    if not (root / "done").exists():
        raise FileNotFoundError(f"{root} holds no finished dataset (no {root / 'done'}): build its shards first")
    manifest = json.loads(manifest_path.read_text())
    out = root / "tokenizer"
    if manifest.get("tokenizer_vocab_size") == vocab_size and (out / "tokenizer.json").exists():
        return out
    records = list(iter_split_metadata(root, "train"))
    # Captions plus the exact label sequences the model is trained on.
    texts = [r["caption"] for r in records] + [f"{PROMPT} {', '.join(r['labels'])}," for r in records]
    tmp = root / f".tokenizer.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_caption_tokenizer(texts, tmp, vocab_size=vocab_size, required_words=KINDS)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest.update(tokenizer="tokenizer", tokenizer_vocab_size=vocab_size)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: train the tokenizer of a built dataset."""
    parser = argparse.ArgumentParser(description="Train the caption tokenizer of a built synthetic dataset.")
    parser.add_argument("--data", type=Path, required=True, help="the dataset folder (e.g. data/shapes)")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer size")
    args = parser.parse_args(argv)
    print(f"tokenizer: {build_tokenizer(args.data, args.vocab_size)}")


if __name__ == "__main__":
    main()
