"""`partclipseg import-weights`: HF CLIPSeg and released PartCLIPSeg weights -> our model.

The numeric proof builds `transformers.CLIPSegForImageSegmentation` from a small config with
random weights (no download), converts it, and compares stage-1 logits and text features.
"""

from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from partclipseg.checkpoint import load_checkpoint, load_model  # noqa: E402
from partclipseg.cli import main  # noqa: E402
from partclipseg.convert import (WeightsError, convert_clipseg, import_weights,  # noqa: E402
                                 read_weights)
from partclipseg.model import Conditioning  # noqa: E402

E, W, D = 32, 64, 16  # projection (text embedding) dim, CLIP widths, decoder width
HF_IMAGE = 64  # HF config image size: 4x4 position grid


def _hf_config(refined: bool = True, **over):
    cfg = dict(
        text_config=dict(hidden_size=W, intermediate_size=2 * W, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, vocab_size=49408),
        vision_config=dict(hidden_size=W, intermediate_size=2 * W, num_attention_heads=4,
                           num_hidden_layers=5, image_size=HF_IMAGE, patch_size=16),
        projection_dim=E, extract_layers=[1, 2, 3], reduce_dim=D, decoder_num_attention_heads=4,
        decoder_intermediate_size=48, use_complex_transposed_convolution=refined)
    cfg.update(over)
    return transformers.CLIPSegConfig(**cfg)


def _randomized(model):
    # HF initializes biases to 0 and norms to 1: randomize everything so no mapping hides.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1))
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return _randomized(transformers.CLIPSegForImageSegmentation(_hf_config()))


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("clipseg-hf")
    hf_model.save_pretrained(path)  # config.json + model.safetensors
    return path


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hf_logits(hf_model, images, embeddings):
    """(B, 3, S, S), (C, E) -> (B, C, S, S): HF runs one condition per image."""
    b = images.shape[0]
    with torch.no_grad():
        return torch.stack([hf_model(pixel_values=images, conditional_embeddings=e.expand(b, -1))
                            .logits.reshape(b, *images.shape[-2:]) for e in embeddings], 1)


@pytest.mark.parametrize("size", [HF_IMAGE, 96])  # 96: HF interpolates its 4x4 grid to 6x6
def test_stage1_logits_match_transformers(hf_model, hf_dir, tmp_path, size):
    res = import_weights(hf_dir, tmp_path / "init.pt", image_size=size, mode="clipseg",
                         adapters=False)
    model, _, record = load_model(res.path)
    assert record["kind"] == "init" and record["import_report"]["unmapped"] == []
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, size, size, generator=g)
    emb = torch.randn(3, E, generator=g)
    with torch.no_grad():
        mul, add = model.film.vectors(emb)
        ours = model.forward_image(images, Conditioning(mul, add, 0, 3)).logits
    ref = _hf_logits(hf_model, images, emb)
    assert ours.shape == ref.shape == (2, 3, size, size)
    err = _rel(ours, ref)
    print(f"relative error, stage-1 logits at {size}px: {err:.2e}")
    assert err <= 1e-4


def test_text_features_match_transformers(hf_model, hf_dir, tmp_path):
    import open_clip

    model, _, _ = load_model(import_weights(hf_dir, tmp_path / "i.pt", mode="clipseg",
                                            adapters=False, image_size=HF_IMAGE).path)
    tokens = open_clip.tokenize(["head", "dog's head", "a much longer class name"], 16)
    with torch.no_grad():
        ours = model.text(tokens)
        ref = hf_model.clip.get_text_features(input_ids=tokens)
        ref = getattr(ref, "pooler_output", ref)  # a tensor before transformers 5
    assert _rel(ours, ref) <= 1e-5


def test_hf_decoder_mlp_is_relu(hf_model, hf_dir):
    """HF's CLIPSeg decoder runs ReLU (it overrides `decoder_hidden_act`): quick_gelu differs."""
    from partclipseg.model import PartCLIPSeg

    src = read_weights(hf_dir)
    conv = convert_clipseg(src.state_dict, src.config, image_size=HF_IMAGE, mode="clipseg",
                           adapters=False)
    assert conv.config.decoder_act == "relu"
    wrong = PartCLIPSeg(conv.config.replace(decoder_act="quick_gelu")).eval()
    wrong.load_state_dict(conv.state_dict, strict=False)
    images, emb = torch.randn(1, 3, HF_IMAGE, HF_IMAGE), torch.randn(1, E)
    with torch.no_grad():
        out = wrong.forward_image(images, Conditioning(*wrong.film.vectors(emb), 0, 1)).logits
    assert _rel(out, _hf_logits(hf_model, images, emb)) > 1e-3


def test_partclipseg_init_from_clipseg(hf_dir, tmp_path, vocab):
    res = import_weights(hf_dir, tmp_path / "init.pt", image_size=HF_IMAGE, vocab=vocab)
    model, vocabulary, record = load_model(res.path)
    assert vocabulary == vocab and record["kind"] == "init"
    sd = model.state_dict()
    for k in ("film.mul.weight", "head.conv.weight", "head.up2.bias"):
        stage2 = k.replace("film.", "film2.").replace("head.", "head2.")
        assert torch.equal(sd[k], sd[stage2])
    init = set(record["import_report"]["initialized"])
    assert {"background", "mix.weight", "embed_mix.weight", "adapters.0.mlp.0.weight"} <= init
    assert not any(k.startswith(("vit.", "text.", "blocks.", "reduces.")) for k in init)
    with torch.no_grad():
        out = model(torch.randn(1, 3, HF_IMAGE, HF_IMAGE), vocab)
    assert out.logits.shape == (1, vocab.num_classes + 1, HF_IMAGE, HF_IMAGE)


def test_bin_file_and_cli(hf_model, hf_dir, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "init.pt"
    rc = main(["import-weights", "--clipseg", str(folder / "pytorch_model.bin"), "--out",
               str(out), "--image-size", "96", "--mode", "clipseg", "--no-adapters"])
    assert rc == 0
    rec = load_checkpoint(out)
    ref = import_weights(hf_dir, tmp_path / "ref.pt", image_size=96, mode="clipseg",
                         adapters=False)
    ref_sd = load_checkpoint(ref.path)["state_dict"]
    assert all(torch.equal(v, ref_sd[k]) for k, v in rec["state_dict"].items())
    assert rec["import_report"]["notes"] == []
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    res = import_weights(folder, tmp_path / "n.pt", image_size=96)
    assert len(res.notes) == 1 and "0.485" in res.notes[0]
    # the wrong flag for the source kind is refused
    assert main(["import-weights", "--partclipseg", str(folder), "--out",
                 str(tmp_path / "x.pt")]) == 2


def test_pickled_pth_is_refused_with_resave_hint(hf_model, tmp_path):
    torch.save({"model": hf_model.state_dict(), "cfg": argparse.Namespace(lr=1)},
               tmp_path / "model_final.pth")
    with pytest.raises(WeightsError, match="(?s)weights-only.*Re-save only its tensors"):
        import_weights(tmp_path / "model_final.pth", tmp_path / "init.pt")
    assert not (tmp_path / "init.pt").exists()


def test_unknown_key_is_named(hf_model, hf_dir, tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = dict(hf_model.state_dict(), **{"decoder.mystery.weight": torch.zeros(3)})
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="decoder.mystery.weight"):
        import_weights(folder, tmp_path / "a.pt")
    res = import_weights(folder, tmp_path / "b.pt", allow_partial=True)
    assert res.conversion.unmapped == ["decoder.mystery.weight"]


def test_non_refined_head_is_refused(tmp_path):
    torch.manual_seed(0)
    hf = transformers.CLIPSegForImageSegmentation(_hf_config(refined=False))
    hf.save_pretrained(tmp_path / "rd64")
    with pytest.raises(WeightsError, match="refined"):
        import_weights(tmp_path / "rd64", tmp_path / "init.pt")


# -- the authors' released PartCLIPSeg layout (synthetic: the real .pth is not available) ------
def _released_state(hf_model, mixing: str) -> dict:
    """HF CLIPSeg wrapped as `partclipseg_model.` plus the released PartCLIPSeg extras, with the
    shapes of kaist-cvml/part-clipseg's modeling_partclipseg.py."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    extras = {
        "decoder.cond_film_mul.weight": r(D, E), "decoder.cond_film_mul.bias": r(D),
        "decoder.cond_film_add.weight": r(D, E), "decoder.cond_film_add.bias": r(D),
        "decoder.reduce_cond_embed.weight": r(E, 2 * E), "decoder.reduce_cond_embed.bias": r(E),
        "decoder.part_obj_with_cond_embed.0.weight": r(D, D, 3, 3),
        "decoder.part_obj_with_cond_embed.0.bias": r(D),
        "decoder.part_obj_with_cond_embed.2.weight": r(D, D // 2, 4, 4),
        "decoder.part_obj_with_cond_embed.2.bias": r(D // 2),
        "decoder.part_obj_with_cond_embed.4.weight": r(D // 2, 1, 4, 4),
        "decoder.part_obj_with_cond_embed.4.bias": r(1),
        "non_object_embedding": r(1, E),
        "visual_adapter.fc.0.weight": r(W // 4, W), "visual_adapter.fc.2.weight": r(W, W // 4),
        "text_adapter.fc.0.weight": r(E // 4, E), "text_adapter.fc.2.weight": r(E, E // 4),
        "tunable_linear.weight": torch.zeros(1000, E),
    }
    if mixing == "linear":
        extras.update({"decoder.part_obj_mlp.weight": r(D, 2 * D),
                       "decoder.part_obj_mlp.bias": r(D)})
    else:
        extras.update({"decoder.part_obj_mlp.0.weight": r(D, 2 * D),
                       "decoder.part_obj_mlp.0.bias": r(D),
                       "decoder.part_obj_mlp.2.weight": r(D, D),
                       "decoder.part_obj_mlp.2.bias": r(D)})
    state = dict(hf_model.state_dict(), **extras)
    return {f"partclipseg_model.{k}": v for k, v in state.items()}


def _write_released(hf_dir, tmp_path, state):
    folder = tmp_path / "released"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    path = folder / "partclipseg_voc_oracle.pth"
    torch.save({"model": state, "iteration": 19999}, path)  # detectron2 record
    return path


def test_released_partclipseg_linear_mixing(hf_model, hf_dir, tmp_path, capsys):
    state = _released_state(hf_model, "linear")
    path = _write_released(hf_dir, tmp_path, state)
    out = tmp_path / "init.pt"
    assert main(["import-weights", "--partclipseg", str(path), "--out", str(out),
                 "--image-size", str(HF_IMAGE)]) == 0
    assert "mixing layer: linear version" in capsys.readouterr().out
    model, _, record = load_model(out)
    rep = record["import_report"]
    assert rep["source_format"] == "partclipseg-released" and rep["mixing"] == "linear"
    assert rep["unmapped"] == [] and rep["initialized"] == []
    assert any(k.startswith("partclipseg_model.text_adapter") for k in
               (u.split(":")[0] for u in rep["unused"]))
    assert rep["approximate"] == []
    assert model.cfg.mix == "linear" and model.cfg.adapter_out_relu
    sd, p = model.state_dict(), "partclipseg_model."
    pairs = {"mix.weight": "decoder.part_obj_mlp.weight", "film2.mul.weight":
             "decoder.cond_film_mul.weight", "embed_mix.weight": "decoder.reduce_cond_embed.weight",
             "head2.up1.weight": "decoder.part_obj_with_cond_embed.2.weight",
             "adapters.2.mlp.0.weight": "visual_adapter.fc.0.weight",
             "film.add.bias": "decoder.film_add.bias"}
    for ours, theirs in pairs.items():
        assert torch.equal(sd[ours], state[p + theirs]), ours
    assert torch.equal(sd["background"], state[p + "non_object_embedding"])


def test_released_partclipseg_mlp_mixing_imports_exactly(hf_model, hf_dir, tmp_path, capsys):
    state = _released_state(hf_model, "mlp")
    path = _write_released(hf_dir, tmp_path, state)
    out = tmp_path / "init.pt"
    assert main(["import-weights", "--partclipseg", str(path), "--out", str(out),
                 "--image-size", str(HF_IMAGE)]) == 0  # no --partial
    assert "mixing layer: mlp version" in capsys.readouterr().out
    model, _, record = load_model(out)
    rep = record["import_report"]
    assert rep["mixing"] == "mlp" and rep["initialized"] == [] and rep["unmapped"] == []
    assert rep["approximate"] == []
    assert record["model_config"]["mix"] == "mlp" and record["model_config"]["adapter_out_relu"]
    sd, p = model.state_dict(), "partclipseg_model."
    for i in (0, 2):
        for n in ("weight", "bias"):
            assert torch.equal(sd[f"mix.{i}.{n}"], state[f"{p}decoder.part_obj_mlp.{i}.{n}"])


def _released_stage2(hf_model, state, images, e, vocab, mixing):
    """Stage-2 logits (B, K, S, S) computed as the released forward does (kaist-cvml/part-clipseg
    modeling_partclipseg.py, d75a599) from the source tensors, for text features e (P + O, E).
    One deviation, on purpose: We gets [e_o ; e_p] with the object's own embedding (the released
    forward gathers e_o without skipping the P parts; ours does not reproduce that)."""
    import torch.nn.functional as F

    t = lambda k: state["partclipseg_model." + k]  # noqa: E731
    n_parts = len(vocab.parts)
    cp, co = torch.tensor(vocab.class_parts), torch.tensor(vocab.class_objects)
    with torch.no_grad():
        hs = hf_model.clip.vision_model(pixel_values=images,
                                        output_hidden_states=True).hidden_states
        fc0, fc2 = t("visual_adapter.fc.0.weight"), t("visual_adapter.fc.2.weight")
        acts = [torch.relu(torch.relu(a @ fc0.T) @ fc2.T) * 0.2 + a * 0.8
                for a in (hs[i + 1] for i in hf_model.extract_layers)]
        cond = torch.cat([e, t("non_object_embedding")])  # parts, objects, background
        b, c = images.shape[0], cond.shape[0]
        acts = [a.unsqueeze(1).repeat(1, c, 1, 1).flatten(0, 1) for a in acts]
        cond = cond.repeat(b, 1)
        dec, x = hf_model.decoder, None
        for i, (a, layer, reduce) in enumerate(zip(acts[::-1], dec.layers, dec.reduces)):
            x = reduce(a) if x is None else reduce(a) + x
            if i == 0:
                x = dec.film_mul(cond)[:, None] * x + dec.film_add(cond)[:, None]
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x
        g = int((x.shape[1] - 1) ** 0.5)
        feats = x[:, 1:].reshape(b, c, g * g, -1)
        po = torch.cat([feats[:, cp], feats[:, n_parts + co]], -1)  # (B, K, g*g, 2D)
        m = "decoder.part_obj_mlp"
        if mixing == "linear":
            mixed = F.linear(po, t(m + ".weight"), t(m + ".bias"))
        else:
            mixed = F.linear(F.relu(F.linear(po, t(m + ".0.weight"), t(m + ".0.bias"))),
                             t(m + ".2.weight"), t(m + ".2.bias"))
        ek = F.linear(torch.cat([e[n_parts + co], e[cp]], 1),
                      t("decoder.reduce_cond_embed.weight"), t("decoder.reduce_cond_embed.bias"))
        mul = F.linear(ek, t("decoder.cond_film_mul.weight"), t("decoder.cond_film_mul.bias"))
        add = F.linear(ek, t("decoder.cond_film_add.weight"), t("decoder.cond_film_add.bias"))
        y = mul[None, :, None] * mixed + add[None, :, None]
        k = y.shape[1]
        y = y.transpose(2, 3).reshape(b * k, -1, g, g)
        h = "decoder.part_obj_with_cond_embed."
        y = F.relu(F.conv2d(y, t(h + "0.weight"), t(h + "0.bias"), padding=1))
        y = F.relu(F.conv_transpose2d(y, t(h + "2.weight"), t(h + "2.bias"), stride=4))
        y = F.conv_transpose2d(y, t(h + "4.weight"), t(h + "4.bias"), stride=4)
    return y.reshape(b, k, *y.shape[-2:])


@pytest.mark.parametrize("mixing", ["linear", "mlp"])
def test_released_partclipseg_stage2_logits_match_reference(hf_model, hf_dir, tmp_path, vocab,
                                                            mixing):
    state = _released_state(hf_model, mixing)
    res = import_weights(_write_released(hf_dir, tmp_path, state), tmp_path / "i.pt",
                         image_size=HF_IMAGE, vocab=vocab)
    model, _, _ = load_model(res.path)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, HF_IMAGE, HF_IMAGE, generator=g)
    e = torch.randn(len(vocab.parts) + len(vocab.objects), E, generator=g)
    model.encode_names = lambda names: e  # text features given (the text tower is tested above)
    with torch.no_grad():
        ours = model(images, vocab).logits[:, :-1]
    ref = _released_stage2(hf_model, state, images, e, vocab, mixing)
    assert ours.shape == ref.shape == (2, vocab.num_classes, HF_IMAGE, HF_IMAGE)
    err = _rel(ours, ref)
    print(f"relative error, stage-2 logits, released layout with {mixing} mixing: {err:.2e}")
    assert err <= 1e-4
    # Without the adapter's output ReLU the numbers differ: the switch is what makes it exact.
    plain = type(model)(model.cfg.replace(adapter_out_relu=False)).eval()
    plain.load_state_dict(model.state_dict())
    plain.encode_names = model.encode_names
    with torch.no_grad():
        assert _rel(plain(images, vocab).logits[:, :-1], ref) > 1e-3


# -- open_clip ViT-B-16 at its real size, through open_clip's state-dict loading path ----------
def _open_clip_to_hf(sd: dict) -> dict:
    """open_clip CLIP state dict -> HF CLIPSeg `clip.*` keys (inverse of the import mapping)."""
    out = {}

    def block(src: str, dst: str) -> None:
        for n, w in zip("qkv", sd[f"{src}.attn.in_proj_weight"].chunk(3)):
            out[f"{dst}.self_attn.{n}_proj.weight"] = w
        for n, b in zip("qkv", sd[f"{src}.attn.in_proj_bias"].chunk(3)):
            out[f"{dst}.self_attn.{n}_proj.bias"] = b
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                     ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}.{b}.weight"], out[f"{dst}.{b}.bias"] = sd[f"{src}.{a}.weight"], \
                sd[f"{src}.{a}.bias"]

    v, t = "clip.vision_model.", "clip.text_model."
    out[v + "embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out[v + "embeddings.class_embedding"] = sd["visual.class_embedding"]
    out[v + "embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for a, b in (("visual.ln_pre", "pre_layrnorm"), ("visual.ln_post", "post_layernorm")):
        out[f"{v}{b}.weight"], out[f"{v}{b}.bias"] = sd[a + ".weight"], sd[a + ".bias"]
    out["clip.visual_projection.weight"] = sd["visual.proj"].T
    out[t + "embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out[t + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out[t + "final_layer_norm.weight"], out[t + "final_layer_norm.bias"] = \
        sd["ln_final.weight"], sd["ln_final.bias"]
    out["clip.text_projection.weight"] = sd["text_projection"].T
    out["clip.logit_scale"] = sd["logit_scale"]
    for i in range(12):
        block(f"visual.transformer.resblocks.{i}", f"{v}encoder.layers.{i}")
        block(f"transformer.resblocks.{i}", f"{t}encoder.layers.{i}")
    return out


@pytest.mark.slow
def test_open_clip_vit_b16_through_load_checkpoint(tmp_path):
    """Random open_clip ViT-B-16 saved as a state-dict file and read back by open_clip's
    `load_checkpoint` (the path local OpenAI-format files take) == the same weights imported
    through the HF CLIPSeg layout; and at this real size our logits match transformers'."""
    import open_clip

    from partclipseg.model import build_model

    torch.manual_seed(0)
    src = open_clip.create_model("ViT-B-16", force_quick_gelu=True)
    weights = tmp_path / "ViT-B-16.pt"
    torch.save(src.state_dict(), weights)
    check = open_clip.create_model("ViT-B-16", force_quick_gelu=True)
    open_clip.load_checkpoint(check, str(weights), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(check.state_dict().values(),
                                                 src.state_dict().values()))
    ours_from_open_clip = build_model("vit_b16", pretrained=str(weights), mode="clipseg",
                                      adapters=False, quick_gelu=True).state_dict()

    hf_cfg = _hf_config(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                           num_hidden_layers=12, image_size=224, patch_size=16),
        projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64,
        decoder_intermediate_size=2048)
    hf = transformers.CLIPSegForImageSegmentation(hf_cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in hf.decoder.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1))
    hf.load_state_dict(_open_clip_to_hf(src.state_dict()), strict=False)
    hf.save_pretrained(tmp_path / "hf")
    res = import_weights(tmp_path / "hf", tmp_path / "init.pt", mode="clipseg", adapters=False)
    model, _, _ = load_model(res.path)
    imported = model.state_dict()
    for k, v in ours_from_open_clip.items():
        if k.startswith(("vit.", "text.")):
            assert torch.equal(imported[k], v), k
    images, emb = torch.randn(1, 3, 352, 352, generator=g), torch.randn(1, 512, generator=g)
    with torch.no_grad():
        ours = model.forward_image(images, Conditioning(*model.film.vectors(emb), 0, 1)).logits
    err = _rel(ours, _hf_logits(hf, images, emb))
    print(f"relative error, stage-1 logits, ViT-B/16 at 352px: {err:.2e}")
    assert err <= 1e-4
