"""Flower ClientApp adapter for fedllm (thin: Flower <-> fedllm.node)."""
