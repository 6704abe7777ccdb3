"""Checkpoint -> ONNX (fp32, fp16 with fp32 islands) -> TensorRT engine, with parity checks."""
