"""Fake ``habana_frameworks.torch.hpex``: Habana's fused optimizer and gradient clipping (no fused kernels)."""
