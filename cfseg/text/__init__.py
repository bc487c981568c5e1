"""Text side of the prototypes: prompts, text encoders, the class-embedding cache and precomputed bank files."""
