"""CLIP tokenizer speed: lpi's (`tokenizers` BPE) against open_clip's SimpleTokenizer, side by side.

    python benchmarks/tokenizer.py [--batch 256]

Both tokenize the same batch of captions in one process, timed round-robin (benchkit), after a
check that their ids are equal. Two levels: `encode` (ids only: `ClipTokenizer.encode_batch`
against SimpleTokenizer.encode per text) and `tokenize` (the padded [B, 77] LongTensor:
`lpi.tokenize` against SimpleTokenizer's `__call__`, which `open_clip.tokenize` is). Two
states: `warm`, each side's word memo (open_clip's BPE cache) already holding the batch's
words, as in a server that has seen them; `cold`, both memos emptied before every call, so
every word goes through BPE. Batches: ASCII captions (the usual case), and captions of which
one in four has non-ASCII text (accents, curly quotes, emoji, CJK), which both sides send
through ftfy.

Threads: one, on both sides. open_clip's tokenizer is Python; lpi's is Python around one
`tokenizers` call per batch for its words not yet memoised, a single sequence, which that library
encodes on the calling thread (its thread pool is for batches of sequences). torch, which builds
only open_clip's output tensor, is held to one thread too.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
from pathlib import Path

from benchkit import table, time_calls, write_json

SUBJECTS = (  # noqa: SIM905 (one line of text, not forty list items)
    "a man|a woman|two dogs|a young boy|a little girl|a group of people|a black cat|an elephant|"
    "a giraffe|three sheep|a baseball player|a surfer|a skateboarder|a chef|an old bus|a red train"
).split("|")
VERBS = (  # noqa: SIM905
    "sitting on|standing next to|riding|holding|walking down|looking at|playing with|eating|"
    "parked near|flying over|lying on|jumping over|waiting for|carrying"
).split("|")
OBJECTS = (  # noqa: SIM905
    "a wooden bench|a busy street|a red frisbee|a plate of food|a large pizza|a white horse|"
    "a laptop computer|a tennis racket|an umbrella|a kite|a traffic light|a bowl of fruit|"
    "a clock tower|a surfboard|two zebras|a fire hydrant|a cup of coffee|the snow"
).split("|")
PLACES = (  # noqa: SIM905
    "in a park|on a sunny day|near the water|in the kitchen|at night|on the beach|in a field|"
    "next to a building|in front of a house|on a city street|during a game|"
).split("|")
NON_ASCII = ["café", "naïve", "façade", "—", "“quoted”", "it’s", "🐶", "☀️", "日本の", "Zürich"]


def caption(rng: random.Random, non_ascii: bool) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)]
    if rng.random() < 0.3:
        words.insert(3, f"with {rng.choice(OBJECTS)},")
    if non_ascii:
        words.insert(rng.randrange(len(words) + 1), rng.choice(NON_ASCII))
    text = " ".join(word for word in words if word)
    return text[0].upper() + text[1:] + rng.choice([".", "", " ."])


def batches(size: int, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {
        "ascii captions": [caption(rng, False) for _ in range(size)],
        "1/4 non-ascii": [caption(rng, row % 4 == 0) for row in range(size)],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="per timed sample")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tokenizer.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import open_clip.tokenizer
    import torch

    import lpi
    from lpi import tokenizer as lpi_tokenizer

    torch.set_num_threads(1)
    reference = open_clip.tokenizer.SimpleTokenizer()
    ours_warm = lpi_tokenizer.clip_tokenizer()
    ours_cold = lpi_tokenizer.ClipTokenizer(memo_words=0)  # memo emptied at every call

    def reference_cold() -> None:
        reference.cache = {token: token for token in lpi_tokenizer.SPECIALS}

    rows = []
    for batch_name, texts in batches(args.batch).items():
        expected = [reference.encode(text) for text in texts]
        assert ours_warm.encode_batch(texts) == ours_cold.encode_batch(texts) == expected
        assert torch.equal(lpi.tokenize(texts), reference(texts))
        calls = {
            ("encode", "warm", "open_clip"): lambda t=texts: [reference.encode(x) for x in t],
            ("encode", "warm", "lpi"): lambda t=texts: ours_warm.encode_batch(t),
            ("encode", "cold", "open_clip"): lambda t=texts: (
                reference_cold(),
                [reference.encode(x) for x in t],
            ),
            ("encode", "cold", "lpi"): lambda t=texts: ours_cold.encode_batch(t),
            ("tokenize", "warm", "open_clip"): lambda t=texts: reference(t),
            ("tokenize", "warm", "lpi"): lambda t=texts: lpi.tokenize(t),
        }
        seconds = time_calls(
            {" ".join(key): fn for key, fn in calls.items()}, args.repeats, args.min_seconds
        )
        for level, state in [("encode", "warm"), ("encode", "cold"), ("tokenize", "warm")]:
            theirs = seconds[f"{level} {state} open_clip"]
            ours = seconds[f"{level} {state} lpi"]
            rows.append(
                {
                    "batch": batch_name,
                    "texts": len(texts),
                    "level": level,
                    "memo": state,
                    "ms_open_clip": theirs * 1e3,
                    "ms_lpi": ours * 1e3,
                    "speedup": theirs / ours,
                }
            )
    columns = [("batch", "{}"), ("texts", "{}"), ("level", "{}"), ("memo", "{}")]
    columns += [("ms_open_clip", "{:.2f}"), ("ms_lpi", "{:.2f}"), ("speedup", "{:.1f}x")]
    print(f"one thread per tokenizer; {os.cpu_count()} cores")
    print(table(columns, rows))
    machine = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": 1,
        "processor": platform.processor() or platform.machine(),
    }
    settings = vars(args) | {"out": str(args.out)}
    write_json(args.out, {"machine": machine, "args": settings, "rows": rows})


if __name__ == "__main__":
    main()
