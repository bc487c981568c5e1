"""Continual learning: stages, distillation terms, the multi-stage protocol (see ../shared/DESIGN.md)."""
