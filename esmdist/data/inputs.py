"""Input files as the readers see them: local or `s3://` (fsspec), decompressed by suffix
(`.gz` with ISA-L's inflate, ~3x zlib; `.zst` frame by frame), read to their proper end of
stream — an input that ends early (a truncated download) is an error naming it, never a
shorter dataset — with a sha256 of the stored bytes taken on the way, and the size and stamp
that tell a later run whether an input changed since."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from typing import BinaryIO

from esmdist.storage import stream_sha256

ZSTD_READ_BYTES = 1 << 20


class FastaError(ValueError):
    """Bad input — a FASTA file or a table, or the file itself: the message names the file, and
    the record number and line where there are any."""


def input_error(path: str, exc: OSError) -> FastaError:
    """What went wrong opening or sizing input `path`, in words that name it and the fix."""
    if isinstance(exc, FileNotFoundError):
        return FastaError(f"{path}: input does not exist")
    if isinstance(exc, PermissionError):
        return FastaError(
            f"{path}: access denied — check the AWS credentials/endpoint in the environment ({exc})"
        )
    return FastaError(f"{path}: cannot open input ({exc})")


def input_stat(path: str) -> dict:
    """The stored size and modification stamp of input `path` (local mtime, or the object
    store's LastModified and ETag): what tells a rerun that an input changed."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
        info = fs.info(root)
    except OSError as exc:
        raise input_error(path, exc) from None
    if info.get("type") == "directory":
        raise FastaError(f"{path}: is a directory, not an input file")
    stamp = info.get("mtime") or " ".join(str(info.get(k, "")) for k in ("LastModified", "ETag"))
    return {"bytes": int(info["size"]), "modified": str(stamp).strip()}


def changed_inputs(recorded: list[dict]) -> list[str]:
    """Which of the inputs `recorded` (`InputFile.identity()` when they were read) differ now,
    each with how: another size; else, when the stamp changed too, a sha256 of the stored bytes
    decides (a copy or a `touch` is not a change)."""
    import fsspec

    changed = []
    for entry in recorded:
        path = entry["path"]
        try:
            now = input_stat(path)
        except FastaError as exc:
            changed.append(str(exc))
            continue
        if now["bytes"] != entry["bytes"]:
            changed.append(f"{path}: {entry['bytes']} bytes then, {now['bytes']} now")
        elif now["modified"] != entry.get("modified"):
            with fsspec.open(path, "rb") as handle:
                digest = stream_sha256(handle)
            if digest != entry["sha256"]:
                changed.append(f"{path}: same size, other content (sha256 differs)")
    return changed


class InputFile:
    """A local or fsspec (`s3://…`) input opened for streaming, decompressed by suffix
    (`.gz`, `.zst`), with a sha256 of the stored (compressed) bytes taken as they are read and
    the size and stamp (`input_stat`) it had when opened."""

    def __init__(self, path: str):
        import fsspec

        self.path = path
        self.sha256 = hashlib.sha256()
        self.stored_bytes = 0
        self.stat = input_stat(path)
        try:
            self._raw = fsspec.open(path, "rb").open()
        except OSError as exc:
            raise input_error(path, exc) from None
        name = path.lower()
        if name.endswith(".gz"):
            from isal import igzip

            self._stream: BinaryIO = igzip.IGzipFile(fileobj=self, mode="rb")
        elif name.endswith((".zst", ".zstd")):
            self._stream = _ZstdFrames(self)
        else:
            self._stream = self

    def identity(self) -> dict:
        """What was read: path, stored bytes, their sha256 and the stamp; an input that changed
        while it was read is an error."""
        if self.stored_bytes != self.stat["bytes"]:
            raise FastaError(
                f"{self.path}: {self.stored_bytes} bytes read but {self.stat['bytes']} stored: "
                "the input changed while it was read"
            )
        return {"path": self.path, "bytes": self.stored_bytes,
                "sha256": self.sha256.hexdigest(), "modified": self.stat["modified"]}  # fmt: skip

    def read(self, size: int = -1) -> bytes:
        """Stored bytes (used by the decompressor, or directly for plain files)."""
        try:
            data = self._raw.read(size)
        except PermissionError as exc:
            raise FastaError(f"{self.path}: access denied while reading ({exc})") from None
        self.sha256.update(data)
        self.stored_bytes += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def read_decompressed(self, size: int) -> bytes:
        try:
            return self._stream.read(size)
        except (EOFError, gzip.BadGzipFile, zlib.error, _isal_error()) as exc:
            raise FastaError(
                f"{self.path}: compressed stream is corrupt or truncated ({exc}); "
                "re-download the file"
            ) from None
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise FastaError(
                    f"{self.path}: zstd stream is corrupt or truncated ({exc})"
                ) from None
            raise

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ZstdFrames:
    """The decompressed bytes of zstd frames one after another (as `zstd` and `pzstd` write
    them), to the end of the last one: input that ends inside a frame is an error."""

    def __init__(self, raw: InputFile):
        import zstandard

        self.raw, self.context = raw, zstandard.ZstdDecompressor()
        self.frame = None
        self.unused = b""
        self.buffer = bytearray()

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.unused or self.raw.read(ZSTD_READ_BYTES)
            self.unused = b""
            if not data:
                if self.frame is not None:
                    raise FastaError(
                        f"{self.raw.path}: zstd stream is truncated (the input ends inside a "
                        "frame); re-download the file"
                    )
                break
            if self.frame is None:
                self.frame = self.context.decompressobj()
            self.buffer += self.frame.decompress(data)
            if self.frame.eof:
                self.unused, self.frame = self.frame.unused_data, None
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out


def _isal_error() -> type[Exception]:
    from isal import isal_zlib

    return isal_zlib.error
