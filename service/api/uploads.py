"""Reading uploaded files within a size limit (shared by the routes that take uploads)."""

from __future__ import annotations

from fastapi import Request, UploadFile

from service.errors import PayloadTooLarge


async def read_limited(upload: UploadFile, limit: int) -> bytes:
    """The whole upload, read in 1 MiB pieces; PayloadTooLarge (413) as soon as it passes ``limit``."""
    chunks, size = [], 0
    while chunk := await upload.read(1024 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the uploaded file is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def refuse_declared_oversize(request: Request, limit: int) -> None:
    """413 before reading anything when Content-Length already says the body is over ``limit``
    (plus 64 KiB for the multipart envelope); bodies without it are bounded by ``read_limited``."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 64 * 1024:
        raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
