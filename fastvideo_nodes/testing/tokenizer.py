"""A small sentencepiece tokenizer trained on the spot, with UMT5's special ids.

pad 0, eos 1, unk 2 as in UMT5. The corpus is generated (pseudo-words plus common English
words and every ASCII character) so that any prompt tokenizes without falling back to <unk>
for ordinary text. Trained once and cached in cache_dir().
"""
from __future__ import annotations

import io
import os
import random
import string

from . import cache_dir

VOCAB_SIZE = 256


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "ne", "mo", "su", "la", "vi", "de", "po", "zu", "fe", "ga", "hi", "jo", "we"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words += ("a the red fox snow boat lake sunset cat dog runs bright static blurred video slow camera "
              "small calm drifting on at of in and with").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", ",", "!", ""])
             for _ in range(3000)]
    return lines + [string.ascii_letters + string.digits + string.punctuation]


def spiece_model() -> tuple[str, bytes]:
    """(path, bytes) of the cached tokenizer model, training it if needed."""
    path = os.path.join(cache_dir(), f"tiny_spiece_v1_{VOCAB_SIZE}.model")
    if not os.path.exists(path):
        import sentencepiece as spm
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=VOCAB_SIZE,
                                       model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       character_coverage=1.0, minloglevel=2)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)  # atomic: parallel test processes never see half a file
    with open(path, "rb") as f:
        return path, f.read()
