"""New class names at run time, without torch: tokenizer + ONNX text tower + the model's ONNX
text head.

    text = TextSide.open(manifest)              # a bundle exported with its text side
    arrays = text.vocab_arrays(vocab)           # the graph's vocabulary inputs, as export.vocab

Token ids are open_clip's: its clean-up (ftfy, HTML unescape twice, whitespace collapsed, lower
case) here, then its BPE through Hugging Face `tokenizers` (`tokenizer.json`, written by
`export.text`), then <start_of_text> ids <end_of_text>, zero-padded to the context length; a
longer name is cut to the context length with <end_of_text> last (open_clip's truncation).
Text features are cached per cleaned name, so a name is encoded once per process.

The model's text recipe is data, not code here: the manifest lists the text head's inputs
(`TextInfo.inputs`), each a rule over the vocabulary that `runtime.vocabulary.recipe_feeds`
follows (the one place a recipe's string handling lives; it lists the rules), and the head
itself is an ONNX graph the model exported (`text_head.onnx`: those inputs -> every vocabulary
input of the image graph). Nothing here knows a model kind.
"""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import bundle as spec
from .backends.onnxruntime import OnnxRuntimeBackend
from .bundle import BundleError
from .vocabulary import Vocabulary, VocabularyError, recipe_feeds

if TYPE_CHECKING:
    from .bundle import Manifest, TextInfo

__all__ = ["TextEncoder", "TextSide", "clean_name", "CLIP_SPLIT_PATTERN", "START_OF_TEXT",
           "END_OF_TEXT"]

START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
# open_clip's SimpleTokenizer pattern (special tokens first, as open_clip's alternation has).
CLIP_SPLIT_PATTERN = (START_OF_TEXT + "|" + END_OF_TEXT +
                      r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def clean_name(name: str) -> str:
    """open_clip's 'lower' clean-up: ftfy.fix_text, HTML unescape (twice), whitespace collapsed
    and stripped, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(name))).strip()
    return " ".join(text.split()).strip().lower()


class TextEncoder:
    """Names -> (N, E) float32 CLIP text features through the tokenizer and the ONNX tower.

    Thread-safe; features are cached per cleaned name (`cache_size` names at most).
    """

    def __init__(self, tokenizer: str | Path, graph: str | Path, context_length: int,
                 threads: int | None = None, cache_size: int = 65536):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("encoding new class names needs `pip install tokenizers ftfy` "
                              "(in the [runtime] extra)") from e
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer))
        except Exception as e:  # tokenizers raises its own types for a damaged file
            raise BundleError(f"{tokenizer} cannot be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); re-export the bundle with "
                              "python -m export.onnx") from e
        # The text tower is a bundle graph like the others: the same session set-up and errors.
        self.tower = OnnxRuntimeBackend(str(graph), "cpu", threads)
        self.context_length = context_length
        self.sot = self.tokenizer.token_to_id(START_OF_TEXT)
        self.eot = self.tokenizer.token_to_id(END_OF_TEXT)
        self._cache: dict[str, np.ndarray] = {}  # cleaned name -> features
        self._clean: dict[str, str] = {}  # raw name -> cleaned name
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Names whose features are cached."""
        with self._lock:
            return len(self._cache)

    def tokenize(self, names: Sequence[str]) -> np.ndarray:
        """(N, context_length) int64 token ids, exactly open_clip.tokenize's."""
        out = np.zeros((len(names), self.context_length), np.int64)
        for i, name in enumerate(names):
            ids = [self.sot, *self.tokenizer.encode(clean_name(name),
                                                    add_special_tokens=False).ids, self.eot]
            if len(ids) > self.context_length:  # open_clip: cut, keep <end_of_text> last
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            out[i, :len(ids)] = ids
        return out

    def encode(self, names: Sequence[str]) -> np.ndarray:
        """(N, E) float32 text features; each distinct name runs through the tower once."""
        with self._lock:
            keys = [self._clean.get(n) for n in names]
        if None in keys:  # ftfy is the slow part of a cache hit: clean each raw name once
            keys = [clean_name(n) if k is None else k for n, k in zip(names, keys)]
            with self._lock:
                if len(self._clean) + len(names) > self._cache_size:
                    self._clean.clear()
                self._clean.update(zip(names, keys))
        with self._lock:
            todo = sorted({k for k in keys if k not in self._cache})
        if todo:
            feats = self.tower.run({spec.TOKENS: self.tokenize(todo)})[spec.TEXT_FEATURES]
            with self._lock:
                if len(self._cache) + len(todo) > self._cache_size:
                    self._cache.clear()
                self._cache.update(zip(todo, np.asarray(feats, np.float32)))
        with self._lock:
            return np.stack([self._cache[k] for k in keys])


class TextSide:
    """A bundle's text encoder plus its text head graph: vocabularies -> graph inputs."""

    def __init__(self, encoder: TextEncoder, head: OnnxRuntimeBackend, info: "TextInfo"):
        self.encoder, self.head, self.info = encoder, head, info

    @classmethod
    def open(cls, manifest: "Manifest", threads: int | None = None) -> "TextSide":
        """The bundle's text side; BundleError (re-export) for bundles exported without it."""
        if manifest.text is None or not all(manifest.has(k) for k in
                                            ("tokenizer", "text_onnx", "text_head")):
            raise BundleError(f"{manifest.root} was exported without its text side, so it "
                              "takes only the names it was exported with: re-export it with "
                              "python -m export.onnx to use new class names")
        encoder = TextEncoder(manifest.file("tokenizer"), manifest.file("text_onnx"),
                              manifest.text.context_length, threads)
        head = OnnxRuntimeBackend(str(manifest.file("text_head")), "cpu", threads)
        want, have = set(manifest.vocab_inputs), set(head.output_names)
        if set(head.input_names) != set(manifest.text.inputs) or not want <= have:
            raise BundleError(f"{manifest.file('text_head')} takes {list(head.input_names)} and "
                              f"gives {sorted(have)}; the manifest's recipe needs "
                              f"{list(manifest.text.inputs)} -> {sorted(want)}: re-export the "
                              "bundle")
        return cls(encoder, head, manifest.text)

    def vocab_arrays(self, vocab: Vocabulary) -> dict[str, np.ndarray]:
        """The graph's vocabulary inputs for `vocab` (`runtime.bundle` layout), as
        `partclipseg.model.deploy.vocab_arrays` computes them in torch: the recipe's names
        through the text tower, then the model's text head graph."""
        if vocab.num_classes == 0:
            raise VocabularyError("the vocabulary is empty")
        texts, feed = recipe_feeds(vocab, self.info.inputs)
        feed.update({k: self.encoder.encode(v) for k, v in texts.items()})
        out = self.head.run(feed)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
