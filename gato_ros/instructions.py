"""Text instructions as Gato's text tokens: a SentencePiece model trained on the instruction set.

Gato tokenizes text with SentencePiece into ids in [0, 32000) (contract.TEXT_VOCAB_SIZE). The instruction set
here is a handful of sentences ("lift the red cube"), so the model is a word-level SentencePiece model: every
piece is a whole word of the set, and a word outside it maps to SentencePiece's unknown id, which is refused
with the words named (a policy never sees a token it was not trained on). Text is lower-cased and split on
whitespace before encoding.

The model's serialized bytes travel inside the ONNX file (contract.META_CONDITIONING, base64), so a runtime
needs nothing else to read an instruction; `sentencepiece` is imported only when a file carries one.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable

import numpy as np

from gato_ros import contract


class InstructionError(ValueError):
    """An instruction the policy cannot take: words outside its vocabulary, or a file without instructions."""


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def train_instruction_model(sentences: Iterable[str]) -> bytes:
    """A word-level SentencePiece model of `sentences` (its serialized proto): one piece per distinct word."""
    import sentencepiece as spm

    lines = sorted({normalize(s) for s in sentences if normalize(s)})
    if not lines:
        raise InstructionError("no instruction text to train on")
    words = {w for line in lines for w in line.split()}
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, model_type="word", vocab_size=len(words) + 3,
        hard_vocab_limit=False, character_coverage=1.0, minloglevel=2, num_threads=1,
        normalization_rule_name="identity",
    )
    return out.getvalue()


class InstructionTokenizer:
    """Instruction text → text token ids, with the vocabulary of the SentencePiece model it was built from."""

    def __init__(self, model: bytes) -> None:
        import sentencepiece as spm

        self.model = model
        self.processor = spm.SentencePieceProcessor(model_proto=model)
        if self.processor.get_piece_size() > contract.TEXT_VOCAB_SIZE:
            raise InstructionError(f"an instruction model of {self.processor.get_piece_size()} pieces exceeds "
                                   f"Gato's text range of {contract.TEXT_VOCAB_SIZE} ids")
        self.unknown_id = self.processor.unk_id()

    @classmethod
    def from_base64(cls, text: str) -> InstructionTokenizer:
        return cls(base64.b64decode(text))

    def to_base64(self) -> str:
        return base64.b64encode(self.model).decode("ascii")

    @property
    def words(self) -> list[str]:
        pieces = (self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size()))
        return sorted(p.lstrip("\u2581") for p in pieces if p.startswith("\u2581"))

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of `text`; InstructionError naming every word outside the vocabulary."""
        clean = normalize(text)
        if not clean:
            raise InstructionError("an empty instruction")
        ids = self.processor.encode(clean)
        unknown = [w for w in clean.split() if self.unknown_id in self.processor.encode(w)]
        if unknown or self.unknown_id in ids:
            raise InstructionError(f"instruction {text!r}: {', '.join(repr(w) for w in unknown)} not in the "
                                   f"policy's vocabulary ({' '.join(self.words)})")
        return np.asarray(ids, dtype=np.int64)


def instruction_tokenizer(conditioning: contract.Conditioning | None) -> InstructionTokenizer:
    """The tokenizer a file's conditioning metadata carries; InstructionError when it carries none."""
    if conditioning is None or not conditioning.instruction_model:
        raise InstructionError("this policy file has no instruction model: it was not trained with instructions")
    return InstructionTokenizer.from_base64(conditioning.instruction_model)
