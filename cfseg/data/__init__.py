"""Datasets: dataset.json readers, transforms, the data module and the synthetic phantom generator."""
