"""Score-based multimodal autoencoders (SBM-AE) with score-ratio dimension reduction."""
