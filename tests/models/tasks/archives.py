"""Test helper: .tar.gz bytes made in memory, like the source distributions tasks are built from."""
from __future__ import annotations

import gzip
import io
import tarfile


def tar_gz(files: dict[str, bytes]) -> bytes:
    """The same bytes for the same files: gzip's header would otherwise carry the current time,
    and two sdists built in different seconds would differ in their sha256 (info.json's source)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(tar_bytes.getvalue())
    return buf.getvalue()
