"""Real photographs, offline: crops, classical baselines at the tokenizer's
bits, and the report (`python -m benchmarks.photos --help`; docs/photos.md).
"""
