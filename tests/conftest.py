"""
Settings for the whole suite.

Hypothesis' default 200 ms deadline per example measures the machine, not
Hookah: on a loaded CI host an example that parses a form in 2 ms can take
300 ms, and the run fails for nothing. The properties here assert what is
produced, never how fast, so the deadline is off for every one of them.
"""

from hypothesis import settings

settings.register_profile("hookah", deadline=None)
settings.load_profile("hookah")
