"""The Engine interface every runtime implements: uint8 NCHW images in, embedding and class probabilities out."""

from __future__ import annotations

import numpy as np
import torch

from mixem.errors import DataError


class Engine:
    """engine(uint8 (B, C, S, S) tensor or ndarray) -> (embedding (B, D), mixture_probs (B, K)[, features (B, F)]).

    Outputs are float32 torch tensors on `device`. `provider` says what actually runs the graph
    (e.g. "CPUExecutionProvider"), `outputs` names the returned tensors in order.
    """

    name: str
    device: torch.device
    image_size: int
    in_channels: int
    provider: str
    outputs: tuple[str, ...] = ("embedding", "mixture_probs")
    path: str  # the model it loaded: a checkpoint directory, a .onnx or a .plan file
    files: tuple[str, ...] = ()  # the files that define the model (engines.model_identity hashes them)
    max_batch: int | None = None  # None = any batch size
    min_batch: int = 1  # a smaller batch (a shard's last, a one-image search) is padded with zeros

    def __call__(self, images) -> tuple[torch.Tensor, ...]:
        x = self._check(images)
        B = x.shape[0]
        if B >= self.min_batch:
            return self._run(x)
        pad = (B, self.min_batch - B)  # rows are independent (eval-mode BN), so zero rows change nothing
        if isinstance(x, np.ndarray):
            x = np.concatenate([x, np.zeros((pad[1], *x.shape[1:]), x.dtype)])
        else:
            x = torch.cat([x, x.new_zeros((pad[1], *x.shape[1:]))])
        return tuple(o[:B] for o in self._run(x))

    def _run(self, x):
        raise NotImplementedError

    def _check(self, x):
        """Refuse anything but uint8 (B, C, S, S) at the engine's size, with one line naming both."""
        C, S = self.in_channels, self.image_size
        want = f"uint8 (B, {C}, {S}, {S})"
        if isinstance(x, np.ndarray):
            dtype, shape = str(x.dtype), tuple(x.shape)
            ok_dtype = x.dtype == np.uint8
        elif isinstance(x, torch.Tensor):
            dtype, shape = str(x.dtype).replace("torch.", ""), tuple(x.shape)
            ok_dtype = x.dtype == torch.uint8
        else:
            raise DataError(
                f"{self.name} engine: expected a {want} torch.Tensor or numpy array, got {type(x).__name__}"
            )
        if not ok_dtype or len(shape) != 4 or shape[1:] != (C, S, S) or shape[0] < 1:
            raise DataError(
                f"{self.name} engine: expected {want} images (NCHW, at the model's size, "
                f"no resizing is done), got {dtype} {shape}"
            )
        if self.max_batch is not None and shape[0] > self.max_batch:
            raise DataError(
                f"{self.name} engine: batch {shape[0]} exceeds this engine's max batch {self.max_batch}; "
                f"split the input or rebuild with a larger --max-batch"
            )
        return x

    def __repr__(self):
        return (
            f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, provider={self.provider!r}, "
            f"image_size={self.image_size}, in_channels={self.in_channels})"
        )
