"""npu.models: builders for the CNN, NeRF-MLP and GNN models the stack is judged on."""
