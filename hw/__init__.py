"""npu.hw: the NPU in Amaranth HDL (only this layer imports amaranth)."""
