"""Hookah, the HTTP event engine: durable webhooks, a WebSub hub and streams."""

__version__ = "0.1.0"
