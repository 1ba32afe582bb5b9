"""npu.compiler: ONNX models to quantized, tiled, scheduled NPU programs."""
