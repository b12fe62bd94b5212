"""Shared model blocks: linear (fused, quantization-ready), attention (calls the kernel
backend), rotary embeddings, norms, embeddings and the LM head."""
