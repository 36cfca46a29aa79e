"""Regenerate `assets/tiny_tokenizer.model`, the sentencepiece model of the `tiny` Pi0.5.

The real PaliGemma tokenizer (257,152 pieces) is not redistributable on PyPI and the machines running the
embedded demo have no network, so the tiny model ships its own: a BPE sentencepiece model with byte fallback
(any text encodes), trained on every LIBERO task instruction plus both prompt templates with 256-bin state
strings. Special ids follow PaliGemma: pad 0, eos 1, bos 2, unk 3.

    python -m policies.pi05.make_tiny_tokenizer            # rewrites policies/pi05/assets/tiny_tokenizer.model
"""
from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from policies.pi05.configuration import TINY_VOCAB_SIZE

ASSET = Path(__file__).parent / "assets" / "tiny_tokenizer.model"
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


def libero_instructions() -> list[str]:
    """Every task instruction of the installed LIBERO benchmark suites, sorted and de-duplicated."""
    from libero.libero import benchmark  # imported here: only this script needs LIBERO

    suites = benchmark.get_benchmark_dict()
    texts = set()
    for name in SUITES:
        suite = suites[name]()
        texts.update(suite.get_task(i).language for i in range(suite.n_tasks))
    return sorted(texts)


def corpus(instructions: list[str], seed: int = 0) -> Iterator[str]:
    """Instructions in both prompt formats (spec A.6), with random 8-d state strings, plus the numbers."""
    rng = np.random.default_rng(seed)
    for _ in range(4):
        for text in instructions:
            state = " ".join(str(v) for v in rng.integers(0, 256, size=8))
            yield f"{text}\n"
            yield f"Task: {text}, State: {state};\nAction: "
    yield " ".join(str(i) for i in range(256))


def train(instructions: list[str], vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(instructions),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--vocab-size", type=int, default=TINY_VOCAB_SIZE)
    args = parser.parse_args()
    instructions = libero_instructions()
    data = train(instructions, args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes, vocab {args.vocab_size}, {len(instructions)} instructions)")


if __name__ == "__main__":
    main()
