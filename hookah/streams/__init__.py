"""Live streams of topics: the registry of open streams, the framing of events, and the reader's parsers."""
