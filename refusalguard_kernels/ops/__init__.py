"""Kernel backends: Triton (triton_penalty), CUDA C++ (cuda_penalty), and their shared torch.library ops (penalty)."""
