"""moe_dist: expert-parallel training of Mixture-of-Experts transformers."""
__version__ = "0.1.0"
