"""mixem.kernels"""
