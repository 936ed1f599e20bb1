"""Durable storage behind one interface, ``IStore``; see ``interface.py``."""
