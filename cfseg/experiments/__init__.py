"""Continual-learning experiments: protocol specs (:mod:`.protocol`), scoring and reports (:mod:`.report`)."""
