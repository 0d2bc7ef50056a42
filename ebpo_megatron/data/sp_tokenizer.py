"""A sentencepiece tokenizer trained in-process on the task's own text (no download).

BPE with ``split_digits`` (numbers are spelled digit by digit), no dummy whitespace prefix, so
``decode(encode(s)) == s`` for the task's strings; ids 0/1/2 are pad / bos / eos (unk = 3).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path) -> None:
        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids and ids past the vocabulary (a model may be wider) are dropped."""
        keep = [i for i in ids if i not in (self.eos_id, self.pad_id, self.bos_id) and 0 <= i < self.vocab_size]
        return self.sp.decode(keep)


def train_tokenizer(texts: Iterable[str], directory: str | Path, vocab_size: int
) -> SentencePieceTokenizer:
    """Train on ``texts`` and write ``tokenizer.model`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, byte_fallback=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    (directory / MODEL_FILE).write_bytes(model.getvalue())
    return SentencePieceTokenizer(directory / MODEL_FILE)
