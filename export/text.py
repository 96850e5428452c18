"""The text side of a bundle, so the runtime encodes class names it was not exported with.

`write_text_side(model, stage)` writes three files that `runtime.text` reads:
  tokenizer.json  open_clip's BPE (vocabulary and merges, its split pattern, byte-level
                  alphabet) as a Hugging Face `tokenizers` tokenizer; the runtime applies
                  open_clip's clean-up (ftfy, HTML unescape, whitespace, lower case) before it
  text.onnx       the text tower: token ids (N, L) int64 -> CLIP text features (N, E) float32
  text_head.onnx  the model's own text head (`partclipseg.model.deploy.TextHead`), traced: the
                  features and index arrays its recipe declares -> every vocabulary input of
                  the image graph; the recipe goes into the manifest (`TextInfo.inputs`)
and checks the ONNX tower and head against PyTorch on names the trace never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime import bundle as spec
from runtime.text import CLIP_SPLIT_PATTERN, END_OF_TEXT, START_OF_TEXT

__all__ = ["clip_tokenizer", "write_text_side", "TEXT_TOLERANCE", "PARITY_VOCABULARY"]

TEXT_TOLERANCE = 1e-4  # relative L2 error of the ONNX text features / head vs PyTorch (FP32)
# Names no export sees, for the head's parity: two objects of two words each, so every recipe
# rule (pieces included) has something to take, and more classes than parts or objects.
PARITY_VOCABULARY = (("purple heron", "beak"), ("purple heron", "wing"),
                     ("orange tractor", "wheel"), ("orange tractor", "cab"),
                     ("orange tractor", "beak"))


def clip_tokenizer() -> Any:
    """open_clip's tokenizer as a `tokenizers.Tokenizer`: the same BPE ids for text that has
    been cleaned as open_clip cleans it (`runtime.text.clean_name`)."""
    from open_clip.tokenizer import SimpleTokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    clip = SimpleTokenizer()
    merges = sorted(clip.bpe_ranks, key=clip.bpe_ranks.get)
    tok = Tokenizer(models.BPE(vocab=dict(clip.encoder), merges=merges,
                               continuing_subword_prefix="", end_of_word_suffix="</w>",
                               fuse_unk=False))
    # open_clip: re.findall(pattern) over the cleaned text, each piece's UTF-8 bytes mapped to
    # the byte-level alphabet, then BPE with "</w>" on the piece's last symbol.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Written in a name they become the special ids, as in open_clip's pattern.
    tok.add_special_tokens([START_OF_TEXT, END_OF_TEXT])
    return tok


def write_text_side(model: Any, vocab: Any, stage: Path, opset: int = 17
                    ) -> tuple[spec.TextInfo, dict[str, str]]:
    """Write the three text files into `stage`, the head traced on `vocab` (the bundle's
    `runtime.vocabulary.Vocabulary`); returns the manifest's TextInfo and the files ({manifest
    key: file name}). Raises ValueError when the ONNX tower or head disagrees with PyTorch
    beyond TEXT_TOLERANCE on names the trace never saw."""
    import torch

    from partclipseg.model.deploy import text_head
    from runtime.text import TextEncoder

    from .graph import ort_run, relative_error, trace

    stage = Path(stage)
    clip_tokenizer().save(str(stage / spec.TOKENIZER_FILE))
    tokens = torch.zeros((2, model.text.context_length), dtype=torch.int64)
    tokens[:, 0], tokens[:, 1] = 49406, 49407  # <start_of_text> <end_of_text>, padded
    trace(model.text.eval(), (tokens,), stage / spec.TEXT_ONNX_FILE, [spec.TOKENS],
          [spec.TEXT_FEATURES], {spec.TOKENS: {0: "names"}, spec.TEXT_FEATURES: {0: "names"}},
          opset)
    # Parity on names the trace never saw: tokens from the runtime's own tokenizer.
    names = ["dog's head", "car", "wheel", "a very long name " * 8, "Ünïcödé  Name!"]
    encoder = TextEncoder(stage / spec.TOKENIZER_FILE, stage / spec.TEXT_ONNX_FILE,
                          model.text.context_length, threads=None)
    tokens = encoder.tokenize(names)
    got = ort_run(stage / spec.TEXT_ONNX_FILE, {spec.TOKENS: tokens})[0]
    with torch.no_grad():
        ref = model.text(torch.from_numpy(tokens)).float().numpy()
    err = relative_error(got, ref)
    if not err <= TEXT_TOLERANCE:
        raise ValueError(f"the ONNX text tower disagrees with PyTorch (relative error {err:.2e}, "
                         f"tolerance {TEXT_TOLERANCE:.0e}); the bundle was not written")
    head = text_head(model)
    head_err = _write_head(head, vocab, stage / spec.TEXT_HEAD_FILE, opset)
    info = spec.TextInfo(model.text.context_length, int(ref.shape[1]), dict(head.recipe),
                         {"rel_error": err, "names": len(names), "head_rel_error": head_err})
    files = {"tokenizer": spec.TOKENIZER_FILE, "text_onnx": spec.TEXT_ONNX_FILE,
             "text_head": spec.TEXT_HEAD_FILE}
    return info, files


def _write_head(head: Any, vocab: Any, path: Path, opset: int) -> float:
    """Trace `head` (a `TextHead`) on `vocab`'s recipe inputs to `path`, every row dimension
    dynamic; returns its relative error against PyTorch on PARITY_VOCABULARY (ValueError above
    TEXT_TOLERANCE)."""
    import torch

    from runtime.vocabulary import Vocabulary

    from .graph import finish_graph, ort_run, relative_error, trace

    names, outputs = list(head.recipe), head.outputs()

    class Traced(torch.nn.Module):  # the tracer wants a tuple of outputs, in a fixed order
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.head(*args)
            return tuple(out[n] for n in outputs)

    dynamic = {n: {0: f"{n}_rows"} for n in names}
    dynamic.update({n: {0: f"{n}_rows"} for n in outputs})
    with torch.no_grad():
        trace(Traced().eval(), head.inputs(vocab), path, names, outputs, dynamic, opset)
    finish_graph(path, log=lambda line: None)
    other = Vocabulary.from_names(PARITY_VOCABULARY)
    with torch.no_grad():
        args = head.inputs(other)
        ref = head(*args)
    got = ort_run(path, {n: a.numpy() for n, a in zip(names, args)})
    err = max(relative_error(g, ref[n].float().numpy()) if ref[n].is_floating_point()
              else float(not (g == ref[n].numpy()).all()) for g, n in zip(got, outputs))
    if not err <= TEXT_TOLERANCE:
        raise ValueError(f"the ONNX text head disagrees with PyTorch on new names (relative "
                         f"error {err:.2e}, tolerance {TEXT_TOLERANCE:.0e}); the bundle was not "
                         "written")
    return err
