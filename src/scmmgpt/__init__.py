"""scmmgpt: a multimodal language model joining single-cell RNA-seq and natural language.

Implementation of scMMGPT (Shi et al., 2025, "Multimodal Language Modeling for High-Accuracy Single
Cell Transcriptomics Analysis and Generation").
"""

__version__ = "0.1.0"
