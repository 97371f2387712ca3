"""`haina data prepare`: read, normalize, filter, scrub, deduplicate, split and report raw documents.

Each stage is a small function over a batch of documents (dicts with id, text, source, label,
meta) returning (kept, dropped-with-reason), so another engine could run the same stages.
"""

from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.pipeline import prepare_documents

__all__ = ["PrepareConfig", "prepare_documents"]
