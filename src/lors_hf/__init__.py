"""lors_hf: LORS (Low-rank Residual Structure) for Hugging Face transformers."""

__version__ = "0.1.0"
