"""The JMAP request path: where a Request goes once it is authenticated (embedded backend, or an upstream)."""
