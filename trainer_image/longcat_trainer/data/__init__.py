"""Training data: the manifest reader (`shards.py`) and, downstream of it, decoding and buckets."""
