"""Passes for TFLite / LiteRT models (Raspberry Pi, Coral Edge TPU), converted from ONNX by onnx2tf."""
