"""Placement algorithms: pure functions and records (tensors in, tensors out; no Ray, no files)."""
