"""Flower ServerApp adapter for fedllm (thin: Flower <-> fedllm.coordinator)."""
