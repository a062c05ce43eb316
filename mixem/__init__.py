"""mixem-fast: MIX'EM unsupervised image classification with fused kernels, export and FAISS clustering."""

__version__ = "0.1.0"
