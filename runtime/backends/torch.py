"""PyTorch reference backend: the checkpoint through partclipseg, same tensor interface.

Imports torch and partclipseg only when constructed (the runtime never needs them otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import IMAGE, BundleError, Manifest
from . import BackendOptions, default_precision, register

__all__ = ["TorchBackend"]


@register("torch")
class TorchBackend:
    """Runs `partclipseg.model.deploy.DeployModel` (what export traces) in eager PyTorch.

    precision "fp32" or "fp16" (CUDA only: the model in half, logits returned as float32).
    """

    name = "torch"
    max_classes = None

    @classmethod
    def open(cls, manifest: Manifest, options: BackendOptions) -> "TorchBackend":
        """The checkpoint `options.checkpoint`, or the one the manifest records (its SHA-256 is
        checked against the manifest's)."""
        device = options.device or "cpu"
        ck = manifest.checkpoint
        path = options.checkpoint or (ck.path if ck else None)
        if not path or not Path(path).is_file():
            raise BundleError(f"the torch backend needs the checkpoint; {path!r} does not "
                              "exist: pass checkpoint=PATH")
        return cls(str(path), manifest.mode, manifest.mean, manifest.std, device,
                   default_precision(device, options.precision), ck.sha256 if ck else None,
                   labels=options.labels)

    def __init__(self, checkpoint: str, mode: str, mean: tuple[float, float, float],
                 std: tuple[float, float, float], device: str = "cpu",
                 precision: str = "fp32", expected_sha256: str | None = None,
                 labels: bool = False):
        import torch

        from partclipseg.checkpoint import load_model
        from partclipseg.model.deploy import DeployModel, deploy_mode

        from ..io import file_sha256

        if expected_sha256 and file_sha256(checkpoint) != expected_sha256:
            raise BundleError(f"{checkpoint} is not the checkpoint this bundle was exported "
                              "from (SHA-256 differs); pass checkpoint= the right file")
        if precision == "int8":
            raise ValueError("the torch backend runs fp32 (and fp16 on CUDA); INT8 is the ONNX "
                             "Runtime backend's (precision='int8')")
        if precision == "fp16" and device == "cpu":
            raise ValueError("the torch backend runs fp16 on CUDA only; use precision='fp32'")
        model, _, _ = load_model(checkpoint, map_location=device)
        if deploy_mode(model.cfg) != mode:
            raise BundleError(f"{checkpoint} is a {deploy_mode(model.cfg)} model, the bundle "
                              f"{mode}")
        self.model = DeployModel(model, mean, std, labels=labels).to(device).eval()
        if precision == "fp16":
            self.model.half()
        self._torch, self.device, self.precision = torch, device, precision
        # The interface the model declares: the one export wrote into the manifest.
        self.input_names = tuple(self.model.input_specs())
        self.output_names = tuple(self.model.output_specs())

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        args = []
        for n in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device)
            args.append(t.to(dtype) if t.is_floating_point() and n != IMAGE else t)
        with torch.inference_mode():  # no module state changes: safe across threads
            out = self.model(*args)
        return {n: (o if o.dtype == torch.int32 else o.float()).cpu().numpy()
                for n, o in zip(self.output_names, out)}

    def close(self) -> None:
        self.model = None
