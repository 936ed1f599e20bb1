"""Outgoing HTTP: the one client every delivery, verification and fetch uses, and the SSRF guard under it."""
