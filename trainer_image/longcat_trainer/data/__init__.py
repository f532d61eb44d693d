"""Training data: the manifest reader (`reader.py`) and, downstream of it, decoding and buckets."""
