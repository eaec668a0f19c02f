"""Encryption at rest in the age format (age-encryption.org/v1), by pyrage, the binding of rage.

The archive is encrypted on the node while it streams, after compression and before the spool, so
the sha256 and the part CRC32s are of the stored, encrypted bytes; a restore decrypts while it
downloads. pyrage's encrypt_io and decrypt_io pull from a reader and push to a writer: the adapters
here feed them the stream chunk by chunk, so neither the archive nor a part of it is ever held
whole (age encrypts in chunks of 64 KiB). The objects are standard age files: `age -d -i key.txt`
decrypts them by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import pyrage
from pyrage import x25519

from checkpointer.archive.codec import READ_SIZE, Chunk, CorruptArchive

MAGIC = b"age-encryption.org/v1\n"
# What the stages of an archive's stream hand each other (a download's parts are bytearrays).
Data = Chunk | bytearray
FORMAT = "age"


@dataclass(frozen=True)
class Keys:
    """A storage's encryption Secret: the recipients checkpoints encrypt to, the identity restores use."""

    recipients: tuple[str, ...]
    # repr=False: the secret key never reaches a log line or an exception message.
    identity: str | None = field(default=None, repr=False)


def parse_recipients(text: str) -> tuple[str, ...]:
    """age public keys, one per line (blank lines and # comments allowed, as age's -R files).

    Raises ValueError naming the first line that is not an age X25519 public key.
    """
    recipients = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            x25519.Recipient.from_str(line)
        except pyrage.RecipientError:
            raise ValueError(f"line {number} of recipients is not an age public key (age1...)") from None
        recipients.append(line)
    return tuple(recipients)


def parse_identity(text: str) -> str:
    """The one age secret key in `text` (as age-keygen writes it, comments allowed).

    Raises ValueError without quoting the text: it is a secret.
    """
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(keys) != 1:
        raise ValueError(f"identity holds {len(keys)} keys; it must hold one age secret key (AGE-SECRET-KEY-1...)")
    try:
        x25519.Identity.from_str(keys[0])
    except pyrage.IdentityError:
        raise ValueError("identity is not an age secret key (AGE-SECRET-KEY-1...)") from None
    return keys[0]


def keys_from_secret(data: Mapping[str, bytes], where: str) -> Keys:
    """A storage's keys from its encryption Secret's data (`recipients`, optional `identity`).

    Checkpoints use the recipients, restores the identity. A Secret without an identity is allowed
    (the secret key may be kept off the cluster): a restore of an encrypted archive then fails.
    Raises ValueError, never quoting a key, when the Secret has no recipients or holds a key that is
    not an age key; `where` names the Secret in the message.
    """
    try:
        recipients = parse_recipients(data.get("recipients", b"").decode())
        identity = parse_identity(data["identity"].decode()) if "identity" in data else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the {where} is not usable: {e}") from None
    if not recipients:
        raise ValueError(f"the {where} has no recipients (age public keys, one per line)")
    return Keys(recipients, identity)


def is_encrypted(head: Data) -> bool:
    return bytes(head[: len(MAGIC)]) == MAGIC


class Undecryptable(CorruptArchive):
    """The stored bytes are age-encrypted, but cannot be decrypted with the storage's identity."""


class _Reader:
    """A file's read() over an iterator of chunks, for pyrage, which pulls (about 8 KiB at a time)."""

    def __init__(self, chunks: Iterable[Data]) -> None:
        self._chunks: Iterator[Data] = iter(chunks)
        self._rest = memoryview(b"")
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            while not self._rest:
                chunk = next(self._chunks, None)
                if chunk is None:
                    return b""
                self._rest = memoryview(chunk)
        except BaseException as e:
            # pyrage turns it into an I/O error with a message only: kept to be raised as it was.
            self.error = e
            raise
        size = len(self._rest) if size < 0 else size
        out = bytes(self._rest[:size])
        self._rest = self._rest[len(out) :]
        return out


class _Writer:
    """A file's write() that hands what pyrage writes on in pieces of `batch` bytes (the last one
    shorter): one piece is one write, hash and progress note of the spool, or one decompression
    call, instead of one per age chunk or per 8 KiB. A piece is a view, valid until the next write."""

    def __init__(self, sink: Callable[[Chunk], object], batch: int) -> None:
        self._sink = sink
        self._view = memoryview(bytearray(batch))
        self._fill = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            if self._fill + len(data) > len(self._view):
                self.flush_buffer()
            if len(data) >= len(self._view):
                self._sink(data)
            else:
                self._view[self._fill : self._fill + len(data)] = data
                self._fill += len(data)
        except BaseException as e:
            self.error = e
            raise
        return len(data)

    def flush(self) -> None:
        """Called by pyrage's own buffering: a piece is handed on only when whole, or at the end."""

    def flush_buffer(self) -> None:
        if self._fill:
            fill, self._fill = self._fill, 0
            self._sink(self._view[:fill])


def _reraise(reader: _Reader, writer: _Writer) -> None:
    for error in (reader.error, writer.error):
        if error is not None:
            raise error


def encrypt(chunks: Iterable[Data], sink: Callable[[Chunk], object], recipients: Iterable[str]) -> None:
    """Encrypt the stream of `chunks` to `recipients`, handing the age file to `sink` in pieces of
    READ_SIZE, each valid until the next. What `chunks` or `sink` raise is raised as it was."""
    keys = [x25519.Recipient.from_str(r) for r in recipients]
    reader, writer = _Reader(chunks), _Writer(sink, READ_SIZE)
    try:
        pyrage.encrypt_io(reader, writer, keys)
    except pyrage.EncryptError:
        _reraise(reader, writer)
        raise
    _reraise(reader, writer)
    writer.flush_buffer()


def decrypt(chunks: Iterable[Data], sink: Callable[[Chunk], object], identity: str) -> None:
    """Decrypt the age file of `chunks`, handing the plaintext to `sink` in pieces of READ_SIZE,
    each valid until the next.

    Raises Undecryptable when the identity is not a recipient, or the file is damaged or cut short
    (every age chunk is authenticated, the last one marked as last); what `chunks` or `sink` raise
    is raised as it was.
    """
    key = x25519.Identity.from_str(identity)
    reader, writer = _Reader(chunks), _Writer(sink, READ_SIZE)
    try:
        pyrage.decrypt_io(reader, writer, [key])
    except (pyrage.DecryptError, OSError) as e:
        _reraise(reader, writer)
        raise Undecryptable(f"the archive cannot be decrypted with the storage's identity: {e}") from None
    _reraise(reader, writer)
    writer.flush_buffer()
