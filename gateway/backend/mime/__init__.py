"""RFC 5322/MIME messages <-> RFC 8621 Email properties for the embedded backend, in three modules:
`parse` (message -> properties), `compose` (Email/set create -> message) and `common` (dates, the `header:`
property grammar, the stdlib parser) that both use. Pure functions; no database, no clock of its own, no I/O.
"""
