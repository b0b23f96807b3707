"""Model-based tests of push resume (RFC 8887 §4.3.5) against real gateway processes."""
