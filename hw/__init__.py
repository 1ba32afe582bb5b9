"""npu.hw: the NPU in Amaranth HDL (components, the NPU top, a simulation top with a DRAM
model, and Verilog export). See docs/hardware.md."""
