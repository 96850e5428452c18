"""The PartCLIPSeg model: shapes, trimming, attention, gradients, frozen parts, equivalences."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from partclipseg.config import ConfigError, load_model_config  # noqa: E402
from partclipseg.model import build_model  # noqa: E402
from partclipseg.training.losses import PartCLIPSegLoss, build_targets  # noqa: E402


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {mode: build_model("tiny", mode=mode) for mode in ("partclipseg", "clipseg")}


@pytest.mark.parametrize("mode", ["partclipseg", "clipseg"])
def test_output_shapes(models, vocab, mode, make_batch):
    m = models[mode]
    x, _, _ = make_batch(torch)
    out = m(x, vocab, need_attention=True)
    k, p, o, s, g = vocab.num_classes, len(vocab.parts), len(vocab.objects), 160, 10
    assert out.logits.shape == (2, k + 1, s, s)
    if mode == "partclipseg":
        assert out.object_logits.shape == (2, o + 1, s, s)
        assert out.part_logits.shape == (2, p + 1, s, s)
        assert out.attention.shape == (2, p + o + 1, g * g, g * g)
    else:
        assert out.object_logits is None and out.part_logits is None
        assert out.attention.shape == (2, k + 1, g * g, g * g)
    assert torch.isfinite(out.logits).all()


def test_vit_is_trimmed_and_pos_embed_resized(models):
    m = models["partclipseg"]
    assert len(m.vit.blocks) == m.cfg.extract_layers[-1] + 1  # blocks past the last tap deleted
    assert m.vit.positional_embedding.shape == (1 + m.cfg.grid_size ** 2, m.cfg.vision_width)


def test_attention_maps_are_probabilities(models, vocab, make_batch):
    m = models["partclipseg"]
    x, _, _ = make_batch(torch)
    attn = m(x, vocab, need_attention=True).attention
    assert (attn >= 0).all()
    # Rows over all keys sum to 1; CLS dropped, so what is left sums to at most 1.
    rows = attn.sum(-1)
    assert (rows <= 1 + 1e-5).all() and (rows > 0.5).all()
    # The explicit-softmax path and the fused SDPA path agree.
    with torch.no_grad():
        a = m(x, vocab, need_attention=True).logits
        b = m(x, vocab, need_attention=False).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_conditions_are_independent_batch_members(models, vocab, make_batch):
    """A class's logits do not depend on which other classes are in the vocabulary."""
    m = models["partclipseg"]
    x, _, _ = make_batch(torch)
    keep = [0, 1, 2]  # the quadruped's classes only
    with torch.no_grad():
        full = m(x, vocab).logits
        sub = m(x, vocab.subset(keep)).logits
    torch.testing.assert_close(sub[:, :3], full[:, keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sub[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def _without_gradient(m, vocab, batch) -> list[str]:
    """Backward of the full loss (every term, L_sep and L_enh included) on `batch`; returns the
    trainable parameters that got no gradient."""
    x, part, obj = batch
    m.zero_grad(set_to_none=True)
    out = m.forward_image(x, m.encode_vocabulary(vocab), need_attention=True)
    loss, terms = PartCLIPSegLoss()(out, vocab, *build_targets(part, obj, vocab.num_classes,
                                                             len(vocab.objects)))
    assert set(terms) == {"os", "obj", "part", "sep", "enh"}
    loss.backward()
    return [n for n, p in m.trainable_parameters()
            if p.grad is None or not p.grad.abs().sum() > 0]


def test_gradients_reach_all_trainable_and_no_frozen(models, vocab, make_batch):
    m = models["partclipseg"]
    assert _without_gradient(m, vocab, make_batch(torch)) == []
    leaked = [n for n, p in m.named_parameters() if not p.requires_grad and p.grad is not None]
    assert leaked == []
    # The frozen CLIP image tower, text transformer and projection stay frozen.
    assert not any(p.requires_grad for p in m.vit.parameters())
    assert not m.text.text_projection.requires_grad
    assert m.text.token_embedding.weight.requires_grad
    m.zero_grad(set_to_none=True)


def test_clipseg_baseline_gradients(models, vocab, make_batch):
    m = models["clipseg"]
    m.zero_grad(set_to_none=True)
    x, part, obj = make_batch(torch)
    cond = m.encode_vocabulary(vocab)
    loss, terms = PartCLIPSegLoss()(m.forward_image(x, cond), vocab,
                                    *build_targets(part, obj, vocab.num_classes, len(vocab.objects)))
    assert set(terms) == {"os"}
    loss.backward()
    assert all(p.grad is not None for _, p in m.trainable_parameters())
    m.zero_grad(set_to_none=True)


def test_stage2_starts_as_copy_of_stage1(models):
    m = models["partclipseg"]
    for a, b in zip(m.head.parameters(), m.head2.parameters()):
        assert a is not b
    fresh = build_model("tiny")
    for a, b in zip(fresh.film.parameters(), fresh.film2.parameters()):
        torch.testing.assert_close(a, b)


def test_mlp_mix_trains_with_the_losses(vocab, make_batch):
    """The released code's variants (MLP Mix, adapter output ReLU): forward, losses, backward."""
    torch.manual_seed(0)
    m = build_model("tiny", mix="mlp", adapter_out_relu=True)
    assert [type(x).__name__ for x in m.mix] == ["Linear", "ReLU", "Linear"]
    assert isinstance(m.adapters[0].mlp[-1], torch.nn.ReLU)
    x, part, obj = make_batch(torch)
    out = m.forward_image(x, m.encode_vocabulary(vocab), need_attention=True)
    loss, terms = PartCLIPSegLoss()(out, vocab, *build_targets(part, obj, vocab.num_classes,
                                                             len(vocab.objects)))
    assert set(terms) == {"os", "obj", "part", "sep", "enh"} and torch.isfinite(loss)
    loss.backward()
    trainable = dict(m.trainable_parameters())
    assert {"mix.0.weight", "mix.0.bias", "mix.2.weight", "mix.2.bias"} <= set(trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_mlp_mix_starts_as_the_linear_mix_average(vocab, make_batch):
    """Both Mix versions start as the average of [F_p ; F_o]: same stage-2 logits at init."""
    torch.manual_seed(0)
    lin = build_model("tiny").eval()
    mlp = build_model("tiny", mix="mlp").eval()
    shared = {k: v for k, v in lin.state_dict().items() if not k.startswith("mix.")}
    mlp.load_state_dict(shared, strict=False)
    x, _, _ = make_batch(torch)
    with torch.no_grad():
        a, b = lin(x, vocab), mlp(x, vocab)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    # ...while the MLP really is one: its ReLU bends once the biases move.
    with torch.no_grad():
        mlp.mix[0].bias.zero_()
        c = mlp(x, vocab)
    assert not torch.allclose(c.logits, a.logits, atol=1e-3)


def test_adapter_out_relu_placement():
    """ReLU on the MLP output, then the residual mix: (1 - r) a + r ReLU(MLP(a))."""
    from partclipseg.model.decoder import Adapter

    torch.manual_seed(0)
    plain, relu = Adapter(8, 4, 0.2), Adapter(8, 4, 0.2, out_relu=True)
    relu.load_state_dict(plain.state_dict())  # same keys either way
    a = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(relu(a), 0.8 * a + 0.2 * torch.relu(plain.mlp(a)))
        torch.testing.assert_close(plain(a), 0.8 * a + 0.2 * plain.mlp(a))


def test_adapters_switch_off_gives_plain_clipseg_decoder():
    m = build_model("tiny", adapters=False)
    assert m.adapters is None
    assert not any("adapters" in n for n, _ in m.named_parameters())


def test_config_errors():
    with pytest.raises(ConfigError, match="shipped configs"):
        load_model_config("no_such_model")
    with pytest.raises(ConfigError, match="extract_layers"):
        load_model_config("tiny", extract_layers=[3, 6, 12])
    with pytest.raises(ConfigError, match="mode"):
        load_model_config("tiny", mode="maskformer")
    with pytest.raises(ConfigError, match="mix"):
        load_model_config("tiny", mix="transformer")
    vision = load_model_config("tiny").vision_cfg
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_model_config("tiny", vision_cfg={**vision, "patch_size": 6})


def test_smaller_patches_keep_the_output_at_input_resolution(vocab, make_batch):
    """Patch 8: twice the token grid, and the mask head upsamples 8x instead of 16x."""
    vision = load_model_config("tiny").vision_cfg
    m = build_model("tiny", vision_cfg={**vision, "patch_size": 8})
    x, _, _ = make_batch(torch)
    out = m(x, vocab, need_attention=True)
    assert m.cfg.grid_size == 20
    assert out.logits.shape[-2:] == (160, 160)
    assert out.attention.shape[-1] == 20 * 20


def test_vit_b16_reference_config_shapes():
    cfg = load_model_config("vit_b16")
    assert (cfg.image_size, cfg.grid_size, cfg.vision_width) == (352, 22, 768)
    assert cfg.extract_layers == (3, 6, 9) and cfg.reduce_dim == 64


@pytest.mark.slow
def test_vit_b16_builds_and_runs(vocab):
    m = build_model("vit_b16").eval()
    assert len(m.vit.blocks) == 10
    with torch.no_grad():
        out = m(torch.randn(1, 3, 352, 352), vocab)
    assert out.logits.shape == (1, vocab.num_classes + 1, 352, 352)


def test_conv_branch_shapes_gradients_and_off_switch(vocab, make_batch):
    """conv_branch > 0 (the tiny model's 32) adds a convolutional encoder feeding both heads
    (stride 4) and the decoder's tokens (grid); 0 keeps the paper's model, without its
    parameters."""
    torch.manual_seed(0)
    m = build_model("tiny", conv_branch=8)
    x, part, obj = make_batch(torch)
    image = m.image_features(x)
    d = m.cfg.reduce_dim
    assert image.high_res.shape == (2, d // 2, 40, 40)
    assert image.grid.shape == (2, m.cfg.grid_size ** 2, d)
    out = m(x, vocab, need_attention=True)
    assert out.logits.shape == (2, vocab.num_classes + 1, 160, 160)
    loss, _ = PartCLIPSegLoss()(out, vocab, *build_targets(part, obj, vocab.num_classes,
                                                         len(vocab.objects)))
    loss.backward()
    branch = dict(m.conv_branch.named_parameters())
    no_grad = [n for n, p in branch.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert branch and no_grad == []
    assert m.head.gate.weight.grad.abs().sum() > 0 and m.head2.gate.weight.grad.abs().sum() > 0
    # Both outputs reach the logits: zeroing either changes them.
    for layer in (m.conv_branch.out4, m.conv_branch.out_grid):
        with torch.no_grad():
            saved = [p.clone() for p in layer.parameters()]
            for p in layer.parameters():
                p.zero_()
            changed = m(x, vocab).logits
            for p, s in zip(layer.parameters(), saved):
                p.copy_(s)
        assert not torch.allclose(changed, out.logits.detach())
    plain = build_model("tiny", conv_branch=0)
    assert plain.conv_branch is None and plain.head.gate is None
    assert plain.image_features(x).high_res is None
    assert not any(k.startswith("conv_branch.") or ".gate." in k for k in plain.state_dict())


def test_stage2_class_selection_equals_the_full_forward(models, vocab, make_batch):
    """forward(classes=...) runs stage 2 for those classes only: the same logits as the full
    forward's rows, in that order, background last."""
    m = models["partclipseg"]
    x, _, _ = make_batch(torch)
    classes = torch.tensor([5, 0, 2])
    with torch.no_grad():
        full = m(x, vocab)
        sub = m(x, vocab, classes=classes)
    assert sub.logits.shape == (2, 4, 160, 160)
    torch.testing.assert_close(sub.logits[:, :3], full.logits[:, classes], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sub.logits[:, -1], full.logits[:, -1])
    torch.testing.assert_close(sub.object_logits, full.object_logits)


# -- the colour-blind object head (ModelConfig.colour_blind, SynthParts' recipe) ----------------
@pytest.fixture(scope="module")
def colour_blind():
    torch.manual_seed(3)
    return build_model("micro", colour_blind=True)


def _same_luma(x):
    """x plus a colour change that leaves every pixel's luma (and so the grey image) unchanged."""
    from partclipseg.model.partclipseg import LUMA
    from runtime.io import CLIP_STD

    # A normalized step d changes luma by sum_j l_j std_j d_j: zero along this direction.
    d = torch.tensor([LUMA[1] * CLIP_STD[1], -LUMA[0] * CLIP_STD[0], 0.0]) * 3
    return x + d.reshape(1, 3, 1, 1)


def test_grey_matrix_is_luma_of_the_unnormalized_image(colour_blind):
    from partclipseg.model.partclipseg import LUMA
    from runtime.io import CLIP_MEAN, CLIP_STD

    x = torch.randn(2, 3, 8, 8)
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    luma = ((x * std + mean) * torch.tensor(LUMA).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(colour_blind.grey(x), (luma - mean) / std, rtol=1e-5, atol=1e-5)
    assert not torch.equal(_same_luma(x), x)
    torch.testing.assert_close(colour_blind.grey(_same_luma(x)), colour_blind.grey(x),
                               rtol=1e-5, atol=1e-5)


def test_colour_blind_shapes_and_word_rows(colour_blind, vocab, make_batch):
    x, _, _ = make_batch(torch, size=64)
    cond = colour_blind.encode_vocabulary(vocab)
    # words: colours (red, blue), then body plans (quadruped, bird)
    assert (cond.num_colour, cond.num_objects) == (2, 4)
    assert cond.film1_mul.shape[0] == len(vocab.parts) + 4 + 1
    assert cond.object_words.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    out = colour_blind.forward_image(x, cond, need_attention=True)
    k, p, o, g = vocab.num_classes, len(vocab.parts), len(vocab.objects), 4
    assert out.logits.shape == (2, k + 1, 64, 64)
    assert out.object_logits.shape == (2, o + 1, 64, 64)
    assert out.part_logits.shape == (2, p + 1, 64, 64)
    assert out.attention.shape == (2, p + o + 1, g * g, g * g)


def test_colour_blind_parts_and_plans_do_not_see_colour(colour_blind, vocab, make_batch):
    """The parts (and body-plan words) read the grey image only; colour words do see colour."""
    x, _, _ = make_batch(torch, size=64)
    with torch.no_grad():
        a = colour_blind(x, vocab)
        b = colour_blind(_same_luma(x), vocab)
    torch.testing.assert_close(a.part_logits, b.part_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a.object_logits[:, :-1], b.object_logits[:, :-1], atol=1e-3)


def test_colour_blind_object_logit_is_the_sum_of_its_words():
    """With every pairing of two colours and two plans, logit(red q) + logit(blue b) equals
    logit(red b) + logit(blue q): each object's score is its colour's plus its plan's."""
    from runtime.vocabulary import Vocabulary

    torch.manual_seed(4)
    m = build_model("micro", colour_blind=True).eval()
    names = ["red quadruped", "blue bird", "red bird", "blue quadruped"]
    v = Vocabulary.from_names([(n, "head") for n in names])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        o = m(x, v).object_logits
    torch.testing.assert_close(o[:, 0] + o[:, 1], o[:, 2] + o[:, 3], rtol=1e-4, atol=1e-4)


def test_colour_blind_gradients_and_class_selection(colour_blind, vocab, make_batch):
    m = colour_blind
    x, part, obj = make_batch(torch, size=64)
    assert _without_gradient(m, vocab, (x, part, obj)) == []
    m.zero_grad(set_to_none=True)
    cond = m.encode_vocabulary(vocab)
    classes = torch.tensor([4, 0])
    with torch.no_grad():
        full = m.forward_image(x, cond)
        sub = m.forward_image(x, cond, classes=classes)
    torch.testing.assert_close(sub.logits[:, :-1], full.logits[:, classes], rtol=1e-5, atol=1e-5)


def test_colour_blind_needs_colour_and_plan_words():
    from runtime.vocabulary import Vocabulary, VocabularyError

    m = build_model("micro", colour_blind=True)
    with pytest.raises(VocabularyError, match="object 'dog' is not two words"):
        m.encode_vocabulary(Vocabulary.from_names([("dog", "head")]))
    with pytest.raises(ConfigError, match="colour_blind needs mode 'partclipseg'"):
        load_model_config("micro", mode="clipseg", colour_blind=True)
