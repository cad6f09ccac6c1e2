"""Checkpoints encrypted at rest: AES-256-GCM, the key only in the job's pods.

The key is a file, a mounted Secret's key, whose path is ``JOULE_CHECKPOINT_KEY_FILE``: 32
raw bytes, or base64 or hex text of 32 bytes. An encrypted checkpoint is

    MAGIC (8 bytes) | VERSION (1 byte) | nonce (12 random bytes) | AES-GCM(serialized state)

with the header and the step number as associated data: a file that was changed, written
with another key, or renamed to another step does not authenticate, and is never unpickled.
Anything else found where an encrypted checkpoint should be (a plaintext one) is refused the
same way, as it could have been planted by whoever may write the volume but has no key.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV = "JOULE_CHECKPOINT_KEY_FILE"
MAGIC = b"JOULEENC"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
NONCE_BYTES = 12
KEY_BYTES = 32
# More than any key file in any of the accepted forms: a larger file is not a key.
MAX_KEY_FILE = 1024


class ConfigError(Exception):
    """What a restart cannot fix, only a change to the job (its key, its checkpoints):
    ``str()`` is one line; the trainer exits ``EXIT_CONFIG`` with it."""


# sysexits.h's EX_CONFIG. joule-launch makes it the container's exit code, and the operator
# fails the job at once on it rather than spend its restarts on the same refusal.
EXIT_CONFIG = 78


class KeyFileError(ConfigError):
    """The key file cannot be used; ``str()`` is one line naming it and what was expected."""


class NotVerified(Exception):
    """A checkpoint that does not authenticate with this job's key; ``str()`` says why."""


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path``: raw, or base64 (standard or URL-safe) or hex text."""
    expected = "32 bytes of key, raw or as base64 or hex text (openssl rand -base64 32)"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(
            f"checkpoint key file {path} cannot be read: {exc.strerror or exc}; expected {expected}"
        ) from None
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(data) <= MAX_KEY_FILE and text:
        for decode in (_hex, base64.b64decode, base64.urlsafe_b64decode):
            try:
                key = decode(text)
            except (binascii.Error, ValueError):
                continue
            if len(key) == KEY_BYTES:
                return key
    found = "is empty" if not data else f"holds {len(data)} bytes that are not such a key"
    if len(data) > MAX_KEY_FILE:
        found = f"holds more than {MAX_KEY_FILE} bytes"
    raise KeyFileError(f"checkpoint key file {path} {found}; expected {expected}")


def _hex(text: bytes) -> bytes:
    return bytes.fromhex(text.decode("ascii"))


def key_from_env(env: dict[str, str] | None = None) -> bytes | None:
    """The key named by ``JOULE_CHECKPOINT_KEY_FILE``; None where it is unset (no encryption)."""
    path = (os.environ if env is None else env).get(KEY_ENV)
    return load_key(Path(path)) if path else None


def _associated(step: int) -> bytes:
    return HEADER + f"step={step}".encode()


def seal(key: bytes, step: int, plain: bytes) -> bytes:
    """``plain`` (a serialized checkpoint of ``step``) as an encrypted file's bytes."""
    nonce = os.urandom(NONCE_BYTES)
    return HEADER + nonce + AESGCM(key).encrypt(nonce, plain, _associated(step))


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC)


def open_sealed(key: bytes, step: int, data: bytes) -> bytes:
    """The serialized checkpoint in ``data``, which must be ``step``'s and sealed with
    ``key``; NotVerified otherwise (never a partial or unauthenticated plaintext)."""
    if not is_sealed(data):
        raise NotVerified("not encrypted, and this job encrypts its checkpoints")
    if len(data) <= len(MAGIC) or data[len(MAGIC)] != VERSION:
        raise NotVerified("the file was changed, or its format is newer than this trainer")
    body = data[len(HEADER) :]
    if len(body) < NONCE_BYTES + 16:
        raise NotVerified("the file was changed: it is too short to be a checkpoint")
    try:
        return AESGCM(key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], _associated(step))
    except InvalidTag:
        raise NotVerified("wrong key, or the file was changed") from None
