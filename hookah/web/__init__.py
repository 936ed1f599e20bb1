"""The HTTP face of Hookah: ``twisted.web`` resources over the core services."""
