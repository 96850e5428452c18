"""The text side's cost for new names: `TextSide.vocab_arrays` on N names none of which is
cached (tokenizer + text tower + text head), then the same N again (cache hits).

    python -m benchmarks.experiments.text_cost --bundle demo/bundle --names 300 --rounds 5

Prints one JSON line (median and every round, in seconds). To compare two versions of the
runtime, run it once per version in alternation (PYTHONPATH=<checkout>), each on a bundle that
version exported; docs/runtime.md reads the result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Sequence

import numpy as np

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.text_cost",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--names", type=int, default=300, help="new names per round (default 300)")
    p.add_argument("--rounds", type=int, default=5)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from runtime.bundle import read_manifest
    from runtime.text import TextSide
    from runtime.vocabulary import Vocabulary, split_class_name

    text = TextSide.open(read_manifest(a.bundle))
    fresh = itertools.count()

    def vocab(n: int) -> Vocabulary:  # n names the encoder has not cached, two-word objects
        k = next(fresh)
        return Vocabulary.from_names([split_class_name(f"thing {k}x{i}'s part {i % 7}")
                                      for i in range(n)])

    text.vocab_arrays(vocab(4))  # sessions warm
    times = []
    for _ in range(a.rounds):
        v = vocab(a.names)
        t = time.perf_counter()
        text.vocab_arrays(v)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    text.vocab_arrays(v)
    print(json.dumps({"bundle": a.bundle, "names": a.names, "median_s": float(np.median(times)),
                      "rounds_s": times, "cached_s": time.perf_counter() - t}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
