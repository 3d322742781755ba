"""A small byte-level BPE tokenizer for the default, randomly initialised model.

The LLaMA-2 tokenizer (32k tokens) is only needed for parity with the reference;
a tiny decoder learns much faster with a vocabulary fitted to its captions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_modules.sequence import PROMPT

__all__ = ["PROMPT", "SPECIAL_TOKENS", "train_caption_tokenizer"]

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
