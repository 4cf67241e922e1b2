"""Segmentation: frame -> per-pixel classes (background, vertebral body, cement, needle)."""
