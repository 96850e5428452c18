"""Canonical part vocabularies of the OV-PARTS benchmarks (Pascal-Part-116, ADE20K-Part-234) and
PartImageNet, as `runtime.vocabulary.Vocabulary` objects.

The class order is the order of the label values in the benchmarks' annotation PNGs: class index
``k`` of ``PASCAL_PART_116`` is pixel value ``k`` in ``annotations_detectron2_part``. The lists are
copied verbatim from the public OV-PARTS release (OpenRobotLab/OV_PARTS, identical copies in
kaist-cvml/part-clipseg); every list names its source file. Class names follow the OV-PARTS
"object's part" style and are split into (object, generalized part) by
``runtime.vocabulary.split_class_name`` (at the last ``"'s "``: one grammar everywhere).

Annotation conventions of the real data (read from the same repositories):

* Pascal-Part-116 (``register_pascal_part_116.py``, ``utils.py``, ``object_part_mapper.py``):
  ``annotations_detectron2_part/{train,val}/*.png`` are 8-bit, value = index into
  ``PASCAL_PART_116_CLASS_NAMES`` (116 classes), 255 = ignore/background.
  ``annotations_detectron2_obj/{train,val}/*.png`` are 8-bit, value = 0-based index into the
  20 PASCAL VOC objects ``PASCAL_PART_116_OBJ_CLASS_NAMES`` (aeroplane = 0), 255 = background:
  the per-object sample list ``annotations_detectron2_part/{split}_obj_label_count.json`` is
  built by ``mask_cls_collect.py`` as ``np.unique(obj_png) - {255}`` and every listed value
  becomes one evaluation sample, and PartCLIPSeg's evaluator reads the object name as
  ``obj_classes[value]``. Four VOC objects (boat, chair, diningtable, sofa) have no part classes.
  Evaluation uses one sample per (image, object class): object pixels of other classes and the
  part labels outside that object are set to ignore.
* ADE20K-Part-234 (``register_ade_part_234.py``): images in ``images/{training,validation}``,
  part labels in ``annotations_detectron2_part/{training,validation}/*.png`` (16-bit PNG,
  value = index into ``ADE20K_PART_234_CLASS_NAMES``, 65535 = ignore). There are no object PNGs:
  object instances are COCO-style annotations in ``ade20k_instance_{train,val}.json`` whose
  ``category_id`` is a 0-based index into ``ADE20K_PART_234_OBJ_CLASS_NAMES`` (44 objects).
  Evaluation uses one sample per object instance; the val protocol also evaluates the
  instances of unseen objects found in the training images ("test on both exclusive train and
  val set", ``load_train_val_json``).
* PartImageNet (``register_partimagenet.py`` of kaist-cvml/part-clipseg, original release
  TACJu/PartImageNet): COCO JSON with 40 part categories (ids 0..39, ``name`` like
  "Quadruped Head", ``supercategory`` like "Quadruped") over 11 supercategories.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from runtime.vocabulary import Vocabulary, VocabularyError, split_class_name

__all__ = [
    "PASCAL_PART_116",
    "PASCAL_PART_116_CLASS_NAMES",
    "PASCAL_PART_116_OBJ_CLASS_NAMES",
    "PASCAL_PART_116_UNSEEN_OBJECTS",
    "ADE20K_PART_234",
    "ADE20K_PART_234_CLASS_NAMES",
    "ADE20K_PART_234_OBJ_CLASS_NAMES",
    "ADE20K_PART_234_UNSEEN_OBJECTS",
    "PARTIMAGENET",
    "PARTIMAGENET_CATEGORIES",
    "VOCABULARIES",
    "split_class_name",
    "vocabulary_from_class_names",
    "partimagenet_vocabulary",
    "get_vocabulary",
]


def vocabulary_from_class_names(
    names: Sequence[str], unseen_objects: Iterable[str] = ()
) -> Vocabulary:
    """Vocabulary from OV-PARTS "object's part" names, keeping their order as class order."""
    return Vocabulary.from_names([split_class_name(n) for n in names], unseen_objects)


# ---------------------------------------------------------------------------------------------
# Pascal-Part-116
# Source: OpenRobotLab/OV_PARTS, baselines/data/datasets/register_pascal_part_116.py
# (OBJ_CLASS_NAMES, CLASS_NAMES, unseen list of OBJ_BASE_CLASS_NAMES); identical in
# kaist-cvml/part-clipseg, baselines/data/datasets/register_pascal_part_116.py.
# ---------------------------------------------------------------------------------------------
PASCAL_PART_116_OBJ_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
"""The 20 PASCAL VOC objects; values of ``annotations_detectron2_obj`` PNGs index this list."""

PASCAL_PART_116_UNSEEN_OBJECTS: tuple[str, ...] = ("bird", "car", "dog", "sheep", "motorbike")

PASCAL_PART_116_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane's body", "aeroplane's stern", "aeroplane's wing", "aeroplane's tail",
    "aeroplane's engine", "aeroplane's wheel", "bicycle's wheel", "bicycle's saddle",
    "bicycle's handlebar", "bicycle's chainwheel", "bicycle's headlight",
    "bird's wing", "bird's tail", "bird's head", "bird's eye", "bird's beak", "bird's torso",
    "bird's neck", "bird's leg", "bird's foot", "bottle's body", "bottle's cap", "bus's wheel",
    "bus's headlight", "bus's front", "bus's side", "bus's back",
    "bus's roof", "bus's mirror", "bus's license plate", "bus's door", "bus's window",
    "car's wheel", "car's headlight", "car's front", "car's side", "car's back", "car's roof",
    "car's mirror", "car's license plate", "car's door", "car's window",
    "cat's tail", "cat's head", "cat's eye", "cat's torso", "cat's neck", "cat's leg",
    "cat's nose", "cat's paw", "cat's ear", "cow's tail", "cow's head", "cow's eye",
    "cow's torso", "cow's neck", "cow's leg", "cow's ear", "cow's muzzle", "cow's horn",
    "dog's tail", "dog's head", "dog's eye", "dog's torso", "dog's neck", "dog's leg",
    "dog's nose", "dog's paw", "dog's ear", "dog's muzzle", "horse's tail", "horse's head",
    "horse's eye", "horse's torso", "horse's neck", "horse's leg", "horse's ear",
    "horse's muzzle", "horse's hoof", "motorbike's wheel", "motorbike's saddle",
    "motorbike's handlebar", "motorbike's headlight", "person's head", "person's eye",
    "person's torso", "person's neck", "person's leg", "person's foot", "person's nose",
    "person's ear", "person's eyebrow", "person's mouth", "person's hair", "person's lower arm",
    "person's upper arm", "person's hand", "pottedplant's pot", "pottedplant's plant",
    "sheep's tail", "sheep's head", "sheep's eye", "sheep's torso", "sheep's neck",
    "sheep's leg", "sheep's ear", "sheep's muzzle", "sheep's horn", "train's headlight",
    "train's head", "train's front", "train's side", "train's back", "train's roof",
    "train's coach", "tvmonitor's screen",
)

PASCAL_PART_116: Vocabulary = vocabulary_from_class_names(
    PASCAL_PART_116_CLASS_NAMES, PASCAL_PART_116_UNSEEN_OBJECTS
)
"""116 classes, 16 objects (the VOC objects that have parts), 42 generalized parts."""


# ---------------------------------------------------------------------------------------------
# ADE20K-Part-234
# Source: OpenRobotLab/OV_PARTS, baselines/data/datasets/register_ade_part_234.py
# (OBJ_CLASS_NAMES, CLASS_NAMES, OBJ_NOVEL_CLASS_NAMES); identical in
# kaist-cvml/part-clipseg, baselines/data/datasets/register_ade_part_234.py.
# ---------------------------------------------------------------------------------------------
ADE20K_PART_234_OBJ_CLASS_NAMES: tuple[str, ...] = (
    "airplane", "armchair", "bed", "bench", "bookcase", "bus", "cabinet", "car", "chair",
    "chandelier", "chest of drawers", "clock", "coffee table", "computer", "cooking stove",
    "desk", "dishwasher", "door", "fan", "glass", "kitchen island", "lamp", "light",
    "microwave", "minibike", "ottoman", "oven", "person", "pool table", "refrigerator",
    "sconce", "shelf", "sink", "sofa", "stool", "swivel chair", "table", "television receiver",
    "toilet", "traffic light", "truck", "van", "wardrobe", "washer",
)
"""The 44 ADE20K objects; ``category_id`` of ``ade20k_instance_*.json`` indexes this list."""

ADE20K_PART_234_UNSEEN_OBJECTS: tuple[str, ...] = (
    "bench", "bus", "fan", "desk", "stool", "truck", "van", "swivel chair", "oven", "ottoman",
    "kitchen island",
)

ADE20K_PART_234_CLASS_NAMES: tuple[str, ...] = (
    "person's arm", "person's back", "person's foot", "person's gaze", "person's hand",
    "person's head", "person's leg", "person's neck", "person's torso", "door's door frame",
    "door's handle", "door's knob",
    "door's panel", "clock's face", "clock's frame", "toilet's bowl", "toilet's cistern",
    "toilet's lid", "cabinet's door", "cabinet's drawer", "cabinet's front", "cabinet's shelf",
    "cabinet's side", "cabinet's skirt", "cabinet's top", "sink's bowl", "sink's faucet",
    "sink's pedestal", "sink's tap", "sink's top", "lamp's arm", "lamp's base", "lamp's canopy",
    "lamp's column",
    "lamp's cord", "lamp's highlight", "lamp's light source", "lamp's shade", "lamp's tube",
    "sconce's arm", "sconce's backplate", "sconce's highlight", "sconce's light source",
    "sconce's shade", "chair's apron",
    "chair's arm", "chair's back", "chair's base", "chair's leg", "chair's seat",
    "chair's seat cushion", "chair's skirt", "chair's stretcher", "chest of drawers's apron",
    "chest of drawers's door", "chest of drawers's drawer",
    "chest of drawers's front", "chest of drawers's leg", "chandelier's arm", "chandelier's bulb",
    "chandelier's canopy", "chandelier's chain", "chandelier's cord", "chandelier's highlight",
    "chandelier's light source", "chandelier's shade",
    "bed's footboard", "bed's headboard", "bed's leg", "bed's side rail", "table's apron",
    "table's drawer", "table's leg", "table's shelf", "table's top", "table's wheel",
    "armchair's apron", "armchair's arm", "armchair's back",
    "armchair's back pillow", "armchair's leg", "armchair's seat", "armchair's seat base",
    "armchair's seat cushion", "ottoman's back", "ottoman's leg", "ottoman's seat",
    "shelf's door", "shelf's drawer", "shelf's front", "shelf's shelf",
    "swivel chair's back", "swivel chair's base", "swivel chair's seat", "swivel chair's wheel",
    "fan's blade", "fan's canopy", "fan's tube", "coffee table's leg", "coffee table's top",
    "stool's leg", "stool's seat", "sofa's arm", "sofa's back",
    "sofa's back pillow", "sofa's leg", "sofa's seat base", "sofa's seat cushion",
    "sofa's skirt", "computer's computer case", "computer's keyboard", "computer's monitor",
    "computer's mouse", "desk's apron", "desk's door", "desk's drawer", "desk's leg",
    "desk's shelf", "desk's top", "wardrobe's door", "wardrobe's drawer", "wardrobe's front",
    "wardrobe's leg", "wardrobe's mirror", "wardrobe's top", "car's bumper", "car's door",
    "car's headlight", "car's hood", "car's license plate", "car's logo",
    "car's mirror", "car's wheel", "car's window", "car's wiper", "bus's bumper", "bus's door",
    "bus's headlight", "bus's license plate", "bus's logo", "bus's mirror", "bus's wheel",
    "bus's window", "bus's wiper", "oven's button panel", "oven's door",
    "oven's drawer", "oven's top", "cooking stove's burner", "cooking stove's button panel",
    "cooking stove's door", "cooking stove's drawer", "cooking stove's oven",
    "cooking stove's stove", "microwave's button panel", "microwave's door",
    "microwave's front",
    "microwave's side", "microwave's top", "microwave's window", "refrigerator's button panel",
    "refrigerator's door", "refrigerator's drawer", "refrigerator's side",
    "kitchen island's door", "kitchen island's drawer", "kitchen island's front",
    "kitchen island's side",
    "kitchen island's top", "dishwasher's button panel", "dishwasher's handle",
    "dishwasher's skirt", "bookcase's door", "bookcase's drawer", "bookcase's front",
    "bookcase's side", "television receiver's base", "television receiver's buttons",
    "television receiver's frame",
    "television receiver's keys", "television receiver's screen",
    "television receiver's speaker", "glass's base", "glass's bowl", "glass's opening",
    "glass's stem", "pool table's bed", "pool table's leg", "pool table's pocket",
    "van's bumper", "van's door", "van's headlight",
    "van's license plate", "van's logo", "van's mirror", "van's taillight", "van's wheel",
    "van's window", "van's wiper", "airplane's door", "airplane's fuselage",
    "airplane's landing gear", "airplane's propeller", "airplane's stabilizer",
    "airplane's turbine engine",
    "airplane's wing", "truck's bumper", "truck's door", "truck's headlight",
    "truck's license plate", "truck's logo", "truck's mirror", "truck's wheel", "truck's window",
    "minibike's license plate", "minibike's mirror", "minibike's seat", "minibike's wheel",
    "washer's button panel",
    "washer's door", "washer's front", "washer's side", "bench's arm", "bench's back",
    "bench's leg", "bench's seat", "traffic light's housing", "traffic light's pole",
    "light's aperture", "light's canopy", "light's diffusor", "light's highlight",
    "light's light source", "light's shade",
)

ADE20K_PART_234: Vocabulary = vocabulary_from_class_names(
    ADE20K_PART_234_CLASS_NAMES, ADE20K_PART_234_UNSEEN_OBJECTS
)
"""234 classes over 44 objects."""


# ---------------------------------------------------------------------------------------------
# PartImageNet (11 supercategories x their parts = 40 part classes)
# Source: kaist-cvml/part-clipseg, baselines/data/datasets/register_partimagenet.py
# (PART_IN_CATEGORIES, the `categories` of the official PartImageNet COCO JSON; the part split per
# supercategory matches the table of TACJu/PartImageNet README.md).
# ---------------------------------------------------------------------------------------------
PARTIMAGENET_CATEGORIES: tuple[dict, ...] = (
    {"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"},
    {"id": 1, "name": "Quadruped Body", "supercategory": "Quadruped"},
    {"id": 2, "name": "Quadruped Foot", "supercategory": "Quadruped"},
    {"id": 3, "name": "Quadruped Tail", "supercategory": "Quadruped"},
    {"id": 4, "name": "Biped Head", "supercategory": "Biped"},
    {"id": 5, "name": "Biped Body", "supercategory": "Biped"},
    {"id": 6, "name": "Biped Hand", "supercategory": "Biped"},
    {"id": 7, "name": "Biped Foot", "supercategory": "Biped"},
    {"id": 8, "name": "Biped Tail", "supercategory": "Biped"},
    {"id": 9, "name": "Fish Head", "supercategory": "Fish"},
    {"id": 10, "name": "Fish Body", "supercategory": "Fish"},
    {"id": 11, "name": "Fish Fin", "supercategory": "Fish"},
    {"id": 12, "name": "Fish Tail", "supercategory": "Fish"},
    {"id": 13, "name": "Bird Head", "supercategory": "Bird"},
    {"id": 14, "name": "Bird Body", "supercategory": "Bird"},
    {"id": 15, "name": "Bird Wing", "supercategory": "Bird"},
    {"id": 16, "name": "Bird Foot", "supercategory": "Bird"},
    {"id": 17, "name": "Bird Tail", "supercategory": "Bird"},
    {"id": 18, "name": "Snake Head", "supercategory": "Snake"},
    {"id": 19, "name": "Snake Body", "supercategory": "Snake"},
    {"id": 20, "name": "Reptile Head", "supercategory": "Reptile"},
    {"id": 21, "name": "Reptile Body", "supercategory": "Reptile"},
    {"id": 22, "name": "Reptile Foot", "supercategory": "Reptile"},
    {"id": 23, "name": "Reptile Tail", "supercategory": "Reptile"},
    {"id": 24, "name": "Car Body", "supercategory": "Car"},
    {"id": 25, "name": "Car Tier", "supercategory": "Car"},
    {"id": 26, "name": "Car Side Mirror", "supercategory": "Car"},
    {"id": 27, "name": "Bicycle Body", "supercategory": "Bicycle"},
    {"id": 28, "name": "Bicycle Head", "supercategory": "Bicycle"},
    {"id": 29, "name": "Bicycle Seat", "supercategory": "Bicycle"},
    {"id": 30, "name": "Bicycle Tier", "supercategory": "Bicycle"},
    {"id": 31, "name": "Boat Body", "supercategory": "Boat"},
    {"id": 32, "name": "Boat Sail", "supercategory": "Boat"},
    {"id": 33, "name": "Aeroplane Head", "supercategory": "Aeroplane"},
    {"id": 34, "name": "Aeroplane Body", "supercategory": "Aeroplane"},
    {"id": 35, "name": "Aeroplane Engine", "supercategory": "Aeroplane"},
    {"id": 36, "name": "Aeroplane Wing", "supercategory": "Aeroplane"},
    {"id": 37, "name": "Aeroplane Tail", "supercategory": "Aeroplane"},
    {"id": 38, "name": "Bottle Mouth", "supercategory": "Bottle"},
    {"id": 39, "name": "Bottle Body", "supercategory": "Bottle"},
)


def _partimagenet_pair(category: dict) -> tuple[str, str]:
    """(object, part) of a PartImageNet category: supercategory and the name without it, lower-case.

    "Car Side Mirror" / "Car" -> ("car", "side mirror").
    """
    name = str(category["name"]).strip()
    sup = str(category.get("supercategory") or name.split(" ", 1)[0]).strip()
    part = name[len(sup):].strip() if name.lower().startswith(sup.lower() + " ") else name
    if not part:
        raise VocabularyError(f"PartImageNet category {category!r} has no part name")
    return sup.lower(), part.lower()


def partimagenet_vocabulary(
    categories: Sequence[dict], unseen_objects: Iterable[str] = ()
) -> Vocabulary:
    """Vocabulary from PartImageNet COCO ``categories`` (sorted by ``id``).

    Objects are the lower-cased supercategories ("quadruped"), parts the lower-cased remainder of
    the name ("head"), so class names read "quadruped's head".
    """
    cats = sorted(categories, key=lambda c: int(c["id"]))
    return Vocabulary.from_names([_partimagenet_pair(c) for c in cats], unseen_objects)


PARTIMAGENET: Vocabulary = partimagenet_vocabulary(PARTIMAGENET_CATEGORIES)
"""40 classes over 11 supercategories. The official release defines no seen/unseen split at the
supercategory level (PartCLIPSeg splits by ImageNet class instead), so no object is unseen here;
pass ``unseen_objects`` to ``partimagenet_vocabulary`` for a custom split."""


VOCABULARIES: dict[str, Vocabulary] = {
    "pascal_part_116": PASCAL_PART_116,
    "ade20k_part_234": ADE20K_PART_234,
    "partimagenet": PARTIMAGENET,
}


def get_vocabulary(name: str) -> Vocabulary:
    """Canonical vocabulary by dataset name ("pascal_part_116", "ade20k_part_234",
    "partimagenet"); separators and case are normalized."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in VOCABULARIES:
        raise VocabularyError(f"unknown vocabulary {name!r}; known: {sorted(VOCABULARIES)}")
    return VOCABULARIES[key]
