"""Front mode's blob forwarding (GATEWAY_PROXY_HTTP): downloads and uploads (RFC 8620 §6) streamed between the
client and the upstream's downloadUrl/uploadUrl with the client's own credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import aiohttp

from gateway.directory import Principal
from gateway.errors import HTTPProblem
from gateway.upstream.base import Blob
from gateway.upstream.client import JSON, UpstreamClient, expand, headers_for

# Response headers a forwarded download keeps (the body is streamed, so no Content-Length/-Encoding).
DOWNLOAD_HEADERS = ("Content-Type", "Content-Disposition", "Cache-Control", "ETag", "Last-Modified")
CHUNK = 65536


async def download(client: UpstreamClient, principal: Principal, account_id: str, blob_id: str, name: str,
                   content_type: str) -> Blob:
    """GET the blob from the upstream; the answer's body streams while the client reads it. An upstream that
    cannot be reached before the headers is Unavailable (503); one that fails later cuts the body short."""
    session = await client.session_of(principal)
    if not session.download_url:
        raise HTTPProblem(404, "The upstream server has no downloadUrl.")
    url = expand(session.download_url, accountId=account_id, blobId=blob_id, name=name, type=content_type)
    try:
        response = await client.http.get(url, headers=headers_for(principal), timeout=client.transfer_timeout)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise client.unreachable(exc) from None
    headers = {h: response.headers[h] for h in DOWNLOAD_HEADERS if h in response.headers}

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise client.unreachable(exc) from None
        finally:
            response.release()

    return Blob(response.status, headers, chunks())


async def upload(client: UpstreamClient, principal: Principal, account_id: str, content_type: str,
                 body: AsyncIterable[bytes]) -> Blob:
    """POST the body to the upstream's uploadUrl (RFC 8620 §6.1), streamed; its answer comes back as it is."""
    session = await client.session_of(principal)
    if not session.upload_url:
        raise HTTPProblem(404, "The upstream server has no uploadUrl.")
    url = expand(session.upload_url, accountId=account_id)
    try:
        async with client.http.post(url, data=body, headers=headers_for(principal, {"Content-Type": content_type}),
                                    timeout=client.transfer_timeout) as up:
            answer = await up.read()
            return Blob.of(up.status, {"Content-Type": up.headers.get("Content-Type", JSON)}, answer)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise client.unreachable(exc) from None
