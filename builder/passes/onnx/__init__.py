"""Passes for ONNX models run by onnxruntime (and TensorRT-ready ONNX)."""
