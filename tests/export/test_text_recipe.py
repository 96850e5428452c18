"""The runtime knows no recipe: a model with a text recipe the runtime has never seen exports its
text head as a graph, declares its recipe as data, and runs through `Segmenter` with names never
exported, equal to torch, with no code of its own in runtime/. Bundles of the previous format
are refused with one line that says "re-export"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from partclipseg.model.deploy import PartsObjectsHead, register_text_head  # noqa: E402
from runtime import Segmenter  # noqa: E402
from runtime import bundle as spec  # noqa: E402
from runtime.bundle import BundleError  # noqa: E402
from runtime.vocabulary import Vocabulary  # noqa: E402

from ..support import ROOT, VOCAB  # noqa: E402

# Names no export of this test sees: new parts, new objects, new classes.
NEW = Vocabulary.from_names([("purple heron", "beak"), ("purple heron", "crest"),
                             ("orange tractor", "wheel"), ("orange tractor", "crest")])


@register_text_head("test_class_names")
class ClassNamesHead(PartsObjectsHead):
    """Test-only: stage 1 as PartCLIPSeg (one condition per part name and per object name), but
    a class's stage-2 embedding mixes its full name ("dog's head", which PartCLIPSeg never
    encodes) with its object's: We [(e_class + e_object) / 2 ; e_part]."""

    recipe = {"part_text": {"text": "part"}, "object_text": {"text": "object"},
              "class_text": {"text": "class"},
              "part_of_class": {"index": "class", "of": "part"},
              "object_of_class": {"index": "class", "of": "object"}}

    def forward(self, part_text: torch.Tensor, object_text: torch.Tensor,
                class_text: torch.Tensor, part_of_class: torch.Tensor,
                object_of_class: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(part_text, object_text, part_of_class, object_of_class)
        m = self.model
        e_k = m.embed_mix(torch.cat([(class_text + object_text[object_of_class]) / 2,
                                     part_text[part_of_class]], dim=1))
        out[spec.CLASS_FILM[0]], out[spec.CLASS_FILM[1]] = m.film2.vectors(e_k)
        return out


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a random-init micro model with the test-only text head."""
    from export.onnx import export_onnx
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    tmp = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(3)
    ckpt = save_checkpoint(tmp / "variant.pt", build_model("micro", text_head="test_class_names"),
                           VOCAB)
    export_onnx(ckpt, tmp / "bundle", fp16=False)
    return ckpt, tmp / "bundle"


def test_a_recipe_the_runtime_never_saw_runs_with_new_names_as_torch(variant):
    from partclipseg.checkpoint import load_model
    from partclipseg.model.deploy import DeployModel, vocab_arrays
    from runtime.postprocess import pred_all
    from runtime.text import TextSide

    ckpt, bundle = variant
    manifest = spec.read_manifest(bundle)
    assert manifest.text.inputs["class_text"] == {"text": "class"}  # the recipe, as data
    model, _, _ = load_model(ckpt)
    ref = vocab_arrays(model, NEW)  # torch: the model's own head and text tower
    got = TextSide.open(manifest, threads=1).vocab_arrays(NEW)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # The whole path: Segmenter (numpy + ONNX Runtime) against DeployModel in eager torch.
    seg = Segmenter.load(bundle, backend="onnxruntime", threads=1)
    size = manifest.input_size
    frames = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    preds = seg.predict_batch(list(frames), classes=list(NEW.class_names))
    deploy = DeployModel(model, manifest.mean, manifest.std).eval()
    with torch.no_grad():
        logits, objects = deploy(torch.from_numpy(frames), *(torch.from_numpy(ref[n]) for n in
                                                            manifest.vocab_inputs))
    for p, lg, ob in zip(preds, logits.numpy(), objects.numpy()):
        want = pred_all(lg, np.asarray(NEW.class_objects), (size, size), ob)
        assert p.class_names == NEW.class_names
        assert np.mean(p.labels == want) >= 0.999


def test_the_runtime_has_no_recipe_code():
    """What the runtime knew of recipes is gone: no model kind, no SynthParts words."""
    import re

    pattern = re.compile(r"colour_blind|colour_film|colour word|body.plan|object_words|"
                         r"ObjectWords|test_class_names", re.I)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "runtime").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits


def test_a_bundle_of_the_previous_format_is_refused_in_one_line(variant, tmp_path):
    import shutil

    old = shutil.copytree(variant[1], tmp_path / "old")
    raw = json.loads((old / spec.MANIFEST).read_text())
    raw["format_version"] = 2
    (old / spec.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="bundle format 2.*re-export it") as e:
        Segmenter.load(old, backend="onnxruntime")
    assert "\n" not in str(e.value)
