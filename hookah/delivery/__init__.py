"""Getting a stored delivery to its target: the dispatcher, per-host gate and breaker, retry schedule, signing, retention."""
