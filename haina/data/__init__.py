"""Data: read, clean, filter, dedup and split raw text; tokenize it into memory-mapped token shards.

Submodules are imported where they are used (shards pull in torch, prepare pulls in pyarrow),
so importing `haina.data` stays cheap.
"""
