"""Reading uploaded files within a size limit (shared by the routes that take uploads)."""

from __future__ import annotations

from fastapi import UploadFile

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
