"""The WebSub hub: subscriptions (verification, leases, denial) and distribution of published content."""
