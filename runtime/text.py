"""New class names at run time, without torch: tokenizer + ONNX text tower + numpy text layers.

    text = TextSide.open(manifest)              # a bundle exported with its text side
    arrays = text.vocab_arrays(vocab)           # the graph's vocabulary inputs, as export.vocab

Token ids are open_clip's: its clean-up (ftfy, HTML unescape twice, whitespace collapsed, lower
case) here, then its BPE through Hugging Face `tokenizers` (`tokenizer.json`, written by
`export.text`), then <start_of_text> ids <end_of_text>, zero-padded to the context length; a
longer name is cut to the context length with <end_of_text> last (open_clip's truncation).
Text features are cached per cleaned name, so a name is encoded once per process.
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
from .vocabulary import ObjectWords, Vocabulary, VocabularyError

if TYPE_CHECKING:
    from .bundle import Manifest, TextInfo

__all__ = ["TextEncoder", "TextSide", "clean_name", "CLIP_SPLIT_PATTERN", "START_OF_TEXT",
           "END_OF_TEXT", "HEAD_ARRAYS"]

START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
# open_clip's SimpleTokenizer pattern (special tokens first, as open_clip's alternation has).
CLIP_SPLIT_PATTERN = (START_OF_TEXT + "|" + END_OF_TEXT +
                      r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# text_head.npz per `TextInfo.conditions`: FiLM (rows D, from E), the background embedding
# (1, E), and with parts and objects We (E, 2E) and FiLM' (D, E).
HEAD_ARRAYS = {"classes": ("film_mul_w", "film_mul_b", "film_add_w", "film_add_b", "background"),
               "parts_objects": ("film_mul_w", "film_mul_b", "film_add_w", "film_add_b",
                                 "background", "embed_mix_w", "embed_mix_b", "film2_mul_w",
                                 "film2_mul_b", "film2_add_w", "film2_add_b")}


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
    """A bundle's text encoder plus its text-only layers: vocabularies -> graph inputs."""

    def __init__(self, encoder: TextEncoder, head: dict[str, np.ndarray], info: "TextInfo"):
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
        path = manifest.file("text_head")
        try:
            with np.load(path, allow_pickle=False) as z:
                head = {k: z[k].astype(np.float32) for k in z.files}
        except Exception as e:
            raise BundleError(f"{path} is corrupt ({type(e).__name__}: {e}); re-export the "
                              "bundle") from e
        missing = [k for k in HEAD_ARRAYS[manifest.text.conditions] if k not in head]
        if missing:
            raise BundleError(f"{path} lacks {missing}; re-export the bundle")
        return cls(encoder, head, manifest.text)

    def _film(self, e: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        h = self.head
        return (e @ h[f"{prefix}_mul_w"].T + h[f"{prefix}_mul_b"],
                e @ h[f"{prefix}_add_w"].T + h[f"{prefix}_add_b"])

    def vocab_arrays(self, vocab: Vocabulary) -> dict[str, np.ndarray]:
        """The graph's vocabulary inputs for `vocab` (`runtime.bundle` layout), as
        `partclipseg.model.deploy.vocab_arrays` computes them in torch."""
        if vocab.num_classes == 0:
            raise VocabularyError("the vocabulary is empty")
        bg = self.head["background"]
        if self.info.conditions == "classes":
            e = np.concatenate([self.encoder.encode(vocab.class_names), bg])
            mul, add = self._film(e, "film")
            return {spec.OBJECT_FILM[0]: mul, spec.OBJECT_FILM[1]: add}
        p, arrays = len(vocab.parts), {}
        if self.info.object_words:  # SynthParts' recipe: an object = colour + body plan
            words = ObjectWords.split(vocab.objects)
            e_words = self.encoder.encode(list(words.words))
            c = len(words.colours)
            colour = np.array([i for i, _ in words.of_object], np.int64)
            plan = c + np.array([j for _, j in words.of_object], np.int64)
            e_parts = self.encoder.encode(list(vocab.parts))
            # Rows per object: its body-plan word (object FiLM) and its colour word.
            mul1, add1 = self._film(np.concatenate([e_parts, e_words[plan], bg]), "film")
            arrays.update(zip(spec.COLOUR_FILM, self._film(e_words[colour], "film")))
            e_obj = (e_words[colour] + e_words[plan]) / 2  # an object's embedding: its words'
        else:
            e = self.encoder.encode(list(vocab.parts) + list(vocab.objects))
            mul1, add1 = self._film(np.concatenate([e, bg]), "film")
            e_parts, e_obj = e[:p], e[p:]
        class_part = np.asarray(vocab.class_parts, np.int64)
        class_object = np.asarray(vocab.class_objects, np.int64)
        e_k = (np.concatenate([e_obj[class_object], e_parts[class_part]], axis=1)
               @ self.head["embed_mix_w"].T + self.head["embed_mix_b"])
        mul2, add2 = self._film(e_k, "film2")
        arrays.update({spec.PART_FILM[0]: mul1[:p], spec.PART_FILM[1]: add1[:p],
                       spec.OBJECT_FILM[0]: mul1[p:], spec.OBJECT_FILM[1]: add1[p:],
                       spec.CLASS_FILM[0]: mul2, spec.CLASS_FILM[1]: add2,
                       spec.CLASS_INDEX[0]: class_part, spec.CLASS_INDEX[1]: class_object})
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}
