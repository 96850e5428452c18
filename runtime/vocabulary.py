"""The part vocabulary: objects, generalized parts and the object-specific classes they form.

An object-specific class such as "dog's head" is the pair (object "dog", generalized part "head").
PartCLIPSeg never encodes the object-specific string; it conditions on the generalized part and the
object separately. This module is pure Python so the runtime, the data loaders and the model all
share one definition.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import UserError

__all__ = ["Vocabulary", "VocabularyError", "class_name", "split_class_name",
           "read_class_file", "name_pieces", "recipe_feeds"]


class VocabularyError(UserError, ValueError):
    """A vocabulary is malformed, empty, or a requested name is not in it."""


def class_name(obj: str, part: str) -> str:
    """Display name of an object-specific class, in the OV-PARTS style ("dog's head")."""
    return f"{obj}'s {part}"


def split_class_name(name: str) -> tuple[str, str]:
    """"object's part" -> ("object", "part"): the one grammar of class names, shared by the
    training data, class files and the runtime.

    The name splits at its LAST "'s ": a part is a plain noun phrase, while an object may be
    possessive itself, so "person's child's hand" is the part "hand" of the object
    "person's child". Whitespace runs become one space. `class_name` is the inverse.
    """
    if not isinstance(name, str) or "'s " not in name:
        raise VocabularyError(f"{name!r} names no part: write \"object's part\" (e.g. "
                              "\"cup's handle\") or an (object, part) pair")
    obj, part = (" ".join(x.split()) for x in name.rsplit("'s ", 1))
    if not obj or not part:
        raise VocabularyError(f"{name!r} has an empty object or part name")
    return obj, part


@dataclass(frozen=True)
class Vocabulary:
    """Object-specific part classes built from objects and generalized parts.

    Attributes:
        objects: object category names, e.g. ("dog", "car").
        parts: generalized part names shared across objects, e.g. ("head", "wheel").
        classes: one (object index, part index) pair per object-specific class, in canonical
            class order (the order of label values in annotation PNGs).
        unseen_objects: names of objects held out from training (zero-shot evaluation).
    """

    objects: tuple[str, ...]
    parts: tuple[str, ...]
    classes: tuple[tuple[int, int], ...]
    unseen_objects: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "classes", tuple((int(o), int(p)) for o, p in self.classes))
        object.__setattr__(self, "unseen_objects", frozenset(self.unseen_objects))
        if not self.classes:
            raise VocabularyError("empty vocabulary: give at least one (object, part) class")
        odd = [p for p in self.parts if isinstance(p, str) and "'s " in p]
        if odd:  # "a's b's c" must name one class: see split_class_name
            raise VocabularyError(f"part names cannot contain \"'s \" ({odd[:3]}): class names "
                                  "split at their last \"'s \", so the possessive belongs to the "
                                  "object name")
        for kind, names in (("object", self.objects), ("part", self.parts)):
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise VocabularyError(f"duplicate {kind} names: {dup}")
            if any(not isinstance(n, str) or not n.strip() for n in names):
                raise VocabularyError(f"{kind} names must be non-empty strings")
        if len(set(self.classes)) != len(self.classes):
            raise VocabularyError("duplicate (object, part) classes")
        for o, p in self.classes:
            if not (0 <= o < len(self.objects) and 0 <= p < len(self.parts)):
                raise VocabularyError(f"class ({o}, {p}) indexes outside objects/parts")
        unknown = self.unseen_objects - set(self.objects)
        if unknown:
            raise VocabularyError(f"unseen objects not in the object list: {sorted(unknown)}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_names(
        cls, names: Iterable[tuple[str, str]], unseen_objects: Iterable[str] = ()
    ) -> "Vocabulary":
        """Build from (object, part) name pairs in canonical class order."""
        pairs = list(names)
        objects: list[str] = []
        parts: list[str] = []
        for o, p in pairs:
            if o not in objects:
                objects.append(o)
            if p not in parts:
                parts.append(p)
        classes = [(objects.index(o), parts.index(p)) for o, p in pairs]
        return cls(tuple(objects), tuple(parts), tuple(classes), frozenset(unseen_objects))

    def to_dict(self) -> dict[str, Any]:
        """JSON- and `torch.load(weights_only=True)`-safe representation."""
        return {
            "objects": list(self.objects),
            "parts": list(self.parts),
            "classes": [list(c) for c in self.classes],
            "unseen_objects": sorted(self.unseen_objects),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        try:
            return cls(
                tuple(d["objects"]),
                tuple(d["parts"]),
                tuple(tuple(c) for c in d["classes"]),
                frozenset(d.get("unseen_objects", ())),
            )
        except (KeyError, TypeError) as e:
            raise VocabularyError(f"malformed vocabulary record ({e!r}); expected keys "
                                  "objects, parts, classes, unseen_objects") from e

    # -- views --------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(class_name(self.objects[o], self.parts[p]) for o, p in self.classes)

    @property
    def class_objects(self) -> tuple[int, ...]:
        """Object index of each class."""
        return tuple(o for o, _ in self.classes)

    @property
    def class_parts(self) -> tuple[int, ...]:
        """Generalized-part index of each class."""
        return tuple(p for _, p in self.classes)

    @property
    def class_seen(self) -> tuple[bool, ...]:
        return tuple(self.objects[o] not in self.unseen_objects for o, _ in self.classes)

    def object_classes(self, obj: int) -> tuple[int, ...]:
        """Indices of the classes that belong to object `obj`."""
        return tuple(k for k, (o, _) in enumerate(self.classes) if o == obj)

    def index(self, name: str) -> int:
        """Index of an object-specific class name; unknown names get close matches suggested."""
        if not isinstance(name, str):
            raise VocabularyError(f"class names are strings (\"object's part\"), got "
                                  f"{type(name).__name__} {name!r}")
        names = self.class_names
        if name in names:
            return names.index(name)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise VocabularyError(f"unknown class {name!r}{hint} (the vocabulary has "
                              f"{len(names)} classes; see Vocabulary.class_names)")

    def object_index(self, name: str) -> int:
        if not isinstance(name, str):
            raise VocabularyError(f"object names are strings, got {type(name).__name__} "
                                  f"{name!r}")
        if name in self.objects:
            return self.objects.index(name)
        close = difflib.get_close_matches(name, self.objects, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise VocabularyError(f"unknown object {name!r}{hint}")

    def subset(self, class_indices: Sequence[int]) -> "Vocabulary":
        """A vocabulary with only the given classes (objects/parts pruned to those used)."""
        if len(class_indices) == 0:
            raise VocabularyError("empty class subset")
        pairs = [(self.objects[self.classes[k][0]], self.parts[self.classes[k][1]])
                 for k in class_indices]
        unseen = {o for o, _ in pairs if o in self.unseen_objects}
        return Vocabulary.from_names(pairs, unseen)

    def seen_subset(self) -> "Vocabulary":
        """The training vocabulary: classes of seen objects only."""
        return self.subset([k for k, s in enumerate(self.class_seen) if s])


def read_class_file(path: str | Path) -> Vocabulary:
    """A class file as a Vocabulary, with line-numbered errors.

    One object-specific class per line, "object's part" (e.g. "dog's head"); blank lines and
    '#' comments are skipped; a trailing " *" marks the class's object as unseen (reporting
    only). Read by `python -m export.vocab` and `partclipseg predict --classes-file`.
    """
    pairs, unseen = [], set()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VocabularyError(f"{path} is not UTF-8 text ({e}); write one \"object's part\" "
                              "per line") from e
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("*"):
            line = line[:-1].strip()
            mark = True
        else:
            mark = False
        try:
            pairs.append(split_class_name(line))
        except VocabularyError as e:
            raise VocabularyError(f"{path}:{n}: {e}") from None
        if mark:
            unseen.add(pairs[-1][0])
    if not pairs:
        raise VocabularyError(f"{path} lists no classes")
    if len(set(pairs)) != len(pairs):
        dup = sorted({f"{o}'s {p}" for o, p in pairs if pairs.count((o, p)) > 1})
        raise VocabularyError(f"{path} lists classes twice: {dup}")
    return Vocabulary.from_names(pairs, unseen)


def name_pieces(names: Sequence[str], axis: str) -> tuple[list[tuple[str, ...]],
                                                           list[list[int]]]:
    """Split each name at its first space into two pieces: (per piece k, its distinct values in
    order of first appearance; per piece k, each name's row among them). VocabularyError names
    a name without a space."""
    tables: list[dict[str, int]] = [{}, {}]  # piece -> its row, in order of first appearance
    rows: list[list[int]] = [[], []]
    for name in names:
        pieces = name.strip().split(None, 1)
        if len(pieces) != 2:
            raise VocabularyError(
                f"{axis} {name!r} is not two words: this model's text recipe reads each {axis} "
                f"name as its first word and the rest (e.g. 'green quadruped'), so every "
                f"{axis} name needs both")
        for k, piece in enumerate(pieces):
            rows[k].append(tables[k].setdefault(piece, len(tables[k])))
    return [tuple(t) for t in tables], rows


def recipe_feeds(vocab: Vocabulary, inputs: Mapping[str, Mapping[str, Any]]
                 ) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """A vocabulary through a model's text recipe: ({input: the names whose text features it
    takes}, {input: its int64 index array}), per input of the model's text head. The recipe
    (`runtime.bundle.TextInfo.inputs`, and the model's `partclipseg.model.deploy.TextHead`)
    is {input: rule}; the rules:
      {"text": AXIS}                  the names of a vocabulary axis ("part", "object",
                                      "class"), in vocabulary order: (N, E) text features
      {"text": AXIS, "piece": k}      the distinct k-th pieces (k = 0, 1) of the axis's names,
                                      each split at its first space into two (`name_pieces`),
                                      in order of first appearance: (M, E) text features
      {"index": AXIS, "piece": k}     (N,) int64: each name's k-th piece, as a row of that table
      {"index": "class", "of": AXIS}  (K,) int64: each class's part or object, as a row of it
    Training (the model's own `encode_vocabulary`), export and the runtime all call this."""
    names = {"part": list(vocab.parts), "object": list(vocab.objects),
             "class": list(vocab.class_names)}
    of_class = {"part": vocab.class_parts, "object": vocab.class_objects}
    pieces: dict[str, tuple[list[tuple[str, ...]], list[list[int]]]] = {}  # split once per axis
    texts: dict[str, list[str]] = {}
    indices: dict[str, np.ndarray] = {}
    for key, rule in inputs.items():
        axis = rule.get("text", rule.get("index"))
        if "piece" in rule and axis not in pieces:
            pieces[axis] = name_pieces(names[axis], axis)
        if "text" in rule:
            texts[key] = (names[axis] if "piece" not in rule
                          else list(pieces[axis][0][rule["piece"]]))
        elif "of" in rule:
            indices[key] = np.asarray(of_class[rule["of"]], np.int64)
        else:
            indices[key] = np.asarray(pieces[axis][1][rule["piece"]], np.int64)
    return texts, indices
