"""The embedded demo: a tiny random checkpoint in the real layout and synthetic videos (no downloads)."""
