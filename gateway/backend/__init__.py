"""The embedded JMAP mail store: RFC 8620 Core + RFC 8621 Mail methods over SQLite, with SMTP delivery.

`service.EmbeddedBackend` is the request path (the `gateway.upstream.base.RequestPath` port) and the
delivery entry point; `smtp.SmtpListener` feeds it from SMTP. The rest are its parts: `store` (SQLite, states,
change log), `mime` (RFC 5322 <-> Email properties), `methods` (the JMAP methods), `refs` (result references).
"""
