"""OpenAI's Responses API over the same engine: POST /v1/responses (streamed or not)."""

from __future__ import annotations


def add_routes(app, service) -> None:
    """Register the routes on `app`; each generating one goes through `service` (serving.app.Service)."""
