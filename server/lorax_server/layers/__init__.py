"""Shared building blocks every architecture spec is assembled from."""
