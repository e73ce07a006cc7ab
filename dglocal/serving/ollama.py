"""ollama's API over the same engine: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version."""

from __future__ import annotations


def add_routes(app, service) -> None:
    """Register the routes on `app`; each generating one goes through `service` (serving.app.Service)."""
