"""JMAP wire types (msgspec Structs named as in RFC 8620 / RFC 8887) and their codecs. No I/O here."""
