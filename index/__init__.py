"""The product gallery: faiss search with SKU aggregation, and the stores that make it durable."""
