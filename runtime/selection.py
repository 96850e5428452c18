"""Class requests -> graph feeds: request parsing, the selection cache and chunking.

A *selection* is a vocabulary (the bundle's, a subset of it, or new names) with the graph's
vocabulary inputs for it, split into chunks a backend accepts. Everything here follows the
graph contract (`runtime.bundle.TensorSpec`): an input's rows are the selection's parts,
objects or classes, its background row stays last, and index inputs are renumbered into the
chunk's rows. No model kind is named here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from . import bundle as spec
from .preprocess import InputError
from .vocabulary import Vocabulary, VocabularyError, class_name, split_class_name

__all__ = ["ClassRequest", "Chunk", "Selection", "Selections", "parse_classes",
           "chunk_classes", "feed_rows"]

ClassRequest = Sequence["str | tuple[str, str]"]  # "object's part" names or (object, part)


def parse_classes(classes: ClassRequest) -> tuple[tuple[str, str], ...]:
    """Checked (object, part) pairs of a class request (`split_class_name` is the grammar);
    InputError / VocabularyError name the first bad entry."""
    if isinstance(classes, (str, bytes)):
        raise InputError("classes must be a list of class names, not one string")
    try:
        items = list(classes)
    except TypeError as e:
        raise InputError(f"classes must be a list of class names, got {type(classes).__name__}"
                         ) from e
    if not items:
        raise VocabularyError("classes is empty: name at least one class, or pass None for "
                              "the default vocabulary")
    pairs = []
    for c in items:
        if isinstance(c, str):
            if not c.strip():
                raise VocabularyError(f"class name {c!r} is empty or whitespace only")
            pairs.append(split_class_name(c))
        elif (isinstance(c, (tuple, list)) and len(c) == 2
              and all(isinstance(x, str) for x in c)):
            obj, part = (" ".join(x.split()) for x in c)
            if not obj or not part:
                raise VocabularyError(f"{c!r} has an empty object or part name")
            pairs.append((obj, part))
        else:
            raise InputError(f"classes must be \"object's part\" strings or (object, part) "
                             f"string pairs, got {type(c).__name__} {c!r}")
    if len(set(pairs)) != len(pairs):
        dup = sorted({class_name(*q) for q in pairs if pairs.count(q) > 1})
        raise VocabularyError(f"duplicate class names in classes: {dup}")
    return tuple(pairs)


@dataclass(frozen=True)
class Chunk:
    """One backend call's share of a selection.

    rows: per vocabulary axis, the indices into the selection's parts / objects / classes
        this chunk covers, in the order of the feed's rows (background excluded).
    feed: the graph's vocabulary inputs for those rows.
    """

    rows: Mapping[str, tuple[int, ...]]
    feed: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Selection:
    """A vocabulary and the graph inputs for it, in chunks."""

    vocab: Vocabulary
    chunks: tuple[Chunk, ...]


def _axis_of(vocab: Vocabulary) -> dict[str, Callable[[int], int]]:
    """class index -> its row on each axis."""
    return {"class": lambda k: k, "object": lambda k: vocab.classes[k][0],
            "part": lambda k: vocab.classes[k][1]}


def chunk_classes(vocab: Vocabulary, specs: Mapping[str, spec.TensorSpec],
                  limit: int | None) -> list[tuple[int, ...]]:
    """Class indices of `vocab` grouped so that every chunk has at most `limit` rows on each
    axis its inputs use. When an input has object rows, an object's classes stay together
    (its object row is shared); otherwise classes split anywhere. Conditions never interact
    in the decoder, so chunked results equal one big run."""
    k = vocab.num_classes
    if not limit:
        return [tuple(range(k))]
    axes = {t.rows for t in specs.values() if t.rows}
    if "object" not in axes:
        return [tuple(range(s, min(k, s + limit))) for s in range(0, k, limit)]
    of = _axis_of(vocab)
    groups: list[list[int]] = []
    for o in range(len(vocab.objects)):
        own = list(vocab.object_classes(o))
        if not own:
            continue
        if len(own) > limit:
            raise VocabularyError(f"object {vocab.objects[o]!r} has {len(own)} classes, more "
                                  f"than the engine's profile maximum {limit}: rebuild with "
                                  "python -m export.trt --max-classes N")
        if groups and all(len({of[a](c) for c in groups[-1] + own}) <= limit for a in axes):
            groups[-1].extend(own)
        else:
            groups.append(own)
    return [tuple(g) for g in groups]


def feed_rows(specs: Mapping[str, spec.TensorSpec], arrays: Mapping[str, np.ndarray],
              full: Vocabulary, vocab: Vocabulary, classes: Sequence[int]) -> Chunk:
    """The chunk of `vocab`'s `classes`: rows of `arrays` (the inputs of vocabulary `full`,
    which holds every class of `vocab` by name) for those classes, their objects and parts
    (each in selection order), background rows last, index inputs renumbered."""
    of = _axis_of(vocab)
    rows = {"class": tuple(classes)}
    for axis in ("object", "part"):
        rows[axis] = tuple(sorted({of[axis](k) for k in classes}))
    names = {"class": lambda i: full.index(vocab.class_names[i]),
             "object": lambda i: full.object_index(vocab.objects[i]),
             "part": lambda i: full.parts.index(vocab.parts[i])}
    full_rows = {a: np.array([names[a](i) for i in r], np.int64) for a, r in rows.items()}
    sizes = spec.axis_sizes(full)
    feed = {}
    for n, t in specs.items():
        a = arrays[n]
        if t.rows is not None:
            take = full_rows[t.rows]
            if t.background:
                take = np.append(take, a.shape[0] - 1)
            a = a[take]
        if t.indexes is not None:  # values are rows of `full`: renumber into this chunk's
            lookup = np.zeros(sizes[t.indexes], np.int64)
            lookup[full_rows[t.indexes]] = np.arange(len(full_rows[t.indexes]))
            a = lookup[a]
        feed[n] = np.ascontiguousarray(a)
    return Chunk(rows, feed)


class Selections:
    """The selections of one bundle: the default vocabulary (the bundle's, or the last
    `set_default`), and an LRU cache of requested class lists. Thread-safe.

    encode: a callable `Vocabulary -> {input: array}` for names the bundle lacks (the text
    side), called at most once per new request; None when the bundle has no text side.
    """

    CACHE = 32  # class subsets whose graph inputs are kept ready

    def __init__(self, manifest: spec.Manifest, arrays: Mapping[str, np.ndarray],
                 limit: int | None, encode: Callable[[Vocabulary], Mapping[str, np.ndarray]],
                 single_chunk: str | None = None):
        self.manifest, self._arrays, self.limit = manifest, arrays, limit
        self._encode = encode
        self._single_chunk = single_chunk  # why a selection must fit one call, or None
        self._default: Selection | None = None
        self._cache: OrderedDict[tuple[tuple[str, str], ...], Selection] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Requested class lists held in the cache (at most CACHE)."""
        with self._lock:
            return len(self._cache)

    def get(self, classes: ClassRequest | None) -> Selection:
        """The selection for `classes` (None: the default)."""
        if classes is None:
            with self._lock:
                sel = self._default
            if sel is None:
                sel = self.build(None)
                with self._lock:
                    self._default = self._default or sel
                    sel = self._default
            return sel
        key = parse_classes(classes)
        with self._lock:
            sel = self._cache.get(key)
            if sel is not None:
                self._cache.move_to_end(key)
                return sel
        sel = self.build(key)
        with self._lock:
            self._cache[key] = sel
            while len(self._cache) > self.CACHE:  # apps that vary requests
                self._cache.popitem(last=False)
        return sel

    def set_default(self, classes: ClassRequest, unseen_objects: Sequence[str] = ()) -> None:
        """Make `classes` the default; errors leave the current default in place."""
        sel = self.build(parse_classes(classes), tuple(unseen_objects))
        with self._lock:
            self._default = sel

    def build(self, pairs: tuple[tuple[str, str], ...] | None,
              unseen_objects: tuple[str, ...] = ()) -> Selection:
        """The selection for `pairs` (None: the bundle's vocabulary). Names the bundle has take
        its precomputed rows; a request with any other name is encoded as a whole."""
        full, arrays = self.manifest.vocabulary, self._arrays
        if pairs is None:
            vocab = full
        else:
            names = [class_name(o, p) for o, p in pairs]
            known = set(full.class_names)
            if all(n in known for n in names):
                vocab = full.subset([full.index(n) for n in names])
                if unseen_objects:
                    vocab = Vocabulary.from_names(pairs, unseen_objects)
            else:
                vocab = Vocabulary.from_names(pairs, unseen_objects)
                full, arrays = vocab, self._encode(vocab)
        specs = self.manifest.vocab_inputs
        groups = chunk_classes(vocab, specs, self.limit)
        if self._single_chunk and len(groups) > 1:
            raise VocabularyError(f"{vocab.num_classes} classes exceed max_classes "
                                  f"{self.limit}, and {self._single_chunk}")
        return Selection(vocab, tuple(feed_rows(specs, arrays, full, vocab, g) for g in groups))
