"""mixem.export: a checkpoint to an ONNX model or a TensorRT plan, each checked for parity with PyTorch.

What runs the exported files lives in mixem.engines (load_engine), which the rest of the package uses.
"""

from mixem.export.api import export_checkpoint
from mixem.export.onnx import OPSET, export_onnx

__all__ = ["export_checkpoint", "export_onnx", "OPSET"]
