"""Retrieval-augmented generation: vector stores, chunking, hybrid retrieval, answers with citations.

`open_store` opens a vector store (Chroma embedded or server, or the exact numpy index); the records
it keeps are chunks of text with metadata and an embedding each.
"""

from haina.rag.store import HNSW, METRICS, CollectionInfo, Hit, Record, VectorStore, open_store

__all__ = ["HNSW", "METRICS", "CollectionInfo", "Hit", "Record", "VectorStore", "open_store"]
