"""Hugging Face models in and out: import a released MoE checkpoint, export one that `transformers` loads, and
turn a dense model into an MoE model (upcycling)."""
