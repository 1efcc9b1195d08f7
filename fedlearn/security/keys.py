"""Site identities: Ed25519 key pairs, fingerprints, and the coordinator's allowlist.

Every site holds one Ed25519 private key (a PEM PKCS#8 file, mode 0600). The coordinator
holds an allowlist of the sites' raw 32-byte public keys in TOML::

    [[site]]
    name = "hospital-a"
    public_key = "<base64 of the 32 raw bytes>"
    revoked = false          # optional, default false

Private key material never appears in an error message or a log line; public keys are
named by their fingerprint (``ed25519:`` + the first 16 hex digits of their SHA-256).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlearn.errors import ConfigError

PUBLIC_KEY_SIZE = 32
FINGERPRINT_PREFIX = "ed25519:"
SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENTRY_FIELDS = frozenset({"name", "public_key", "revoked"})


# ---------------------------------------------------------------------------------------------
# files


def write_file_atomic(path: str | Path, data: bytes, *, mode: int, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` with exactly ``mode``; the file never exists with other bits.

    The bytes go to a temporary file in the same directory, created 0600 and chmod-ed to
    ``mode`` before it is renamed into place, so a reader never sees a partial file or a
    secret with loose permissions. Without ``overwrite`` an existing file is refused with
    ConfigError (checked again at rename time, so a racing writer is not clobbered).
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists (refusing to overwrite it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, target)
        else:
            # link() fails if the target appeared meanwhile; rename() would silently replace it.
            try:
                os.link(tmp_name, target)
            except FileExistsError as exc:
                raise ConfigError(f"{target} already exists (refusing to overwrite it)") from exc
            os.unlink(tmp_name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


# ---------------------------------------------------------------------------------------------
# keys


def generate_site_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key for one site."""
    return Ed25519PrivateKey.generate()


def save_private_key(path: str | Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> Path:
    """Write ``key`` as unencrypted PEM PKCS#8 with mode 0600; refuse to overwrite unless asked."""
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    return write_file_atomic(path, pem, mode=0o600, overwrite=overwrite)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM PKCS#8 Ed25519 private key written by :func:`save_private_key`."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"private key file {source} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read private key file {source}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted PEM without a password
        raise ConfigError(
            f"{source} is an encrypted private key; fedlearn needs it unencrypted"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        # The library's message may quote the input; do not pass it on.
        raise ConfigError(f"{source} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{source} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key of a private or public Ed25519 key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def fingerprint(public_key: bytes) -> str:
    """Short, log-safe name of a public key: ``ed25519:`` + 16 hex digits of its SHA-256."""
    return FINGERPRINT_PREFIX + hashlib.sha256(bytes(public_key)).hexdigest()[:16]


def encode_public_key(public_key: bytes) -> str:
    """Standard base64 of the raw 32-byte public key, as written in the allowlist."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes")
    return base64.b64encode(public_key).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """Strictly decode a base64 public key; ValueError unless it is exactly 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("public_key is not valid base64") from exc
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"public_key decodes to {len(raw)} bytes; an Ed25519 public key has {PUBLIC_KEY_SIZE}"
        )
    return raw


def check_site_name(name: str) -> str:
    """Return ``name`` if it is a valid site name, else raise ConfigError."""
    if not SITE_NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"invalid site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def allowlist_entry_toml(name: str, public_key: bytes, *, revoked: bool = False) -> str:
    """A ready-to-paste ``[[site]]`` block for the allowlist file."""
    check_site_name(name)
    return (
        "[[site]]\n"
        f'name = "{name}"\n'
        f'public_key = "{encode_public_key(public_key)}"\n'
        f"revoked = {'true' if revoked else 'false'}\n"
    )


# ---------------------------------------------------------------------------------------------
# allowlist


@dataclass(frozen=True, slots=True)
class SiteEntry:
    """One allowlisted site."""

    name: str
    public_key: bytes
    revoked: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def __repr__(self) -> str:  # keep the raw key out of reprs and logs
        return f"SiteEntry(name={self.name!r}, key={self.fingerprint}, revoked={self.revoked})"


class Allowlist:
    """The set of sites allowed to join, indexed by public key and by name (both unique)."""

    def __init__(self, entries: Iterable[SiteEntry] = ()) -> None:
        self._by_key: dict[bytes, SiteEntry] = {}
        self._by_name: dict[str, SiteEntry] = {}
        for entry in entries:
            check_site_name(entry.name)
            if len(entry.public_key) != PUBLIC_KEY_SIZE:
                raise ConfigError(f"site {entry.name!r}: public key must have 32 bytes")
            if entry.name in self._by_name:
                raise ConfigError(f"site {entry.name!r} is listed twice")
            other = self._by_key.get(entry.public_key)
            if other is not None:
                raise ConfigError(
                    f"sites {other.name!r} and {entry.name!r} share the public key "
                    f"{entry.fingerprint}"
                )
            self._by_key[entry.public_key] = entry
            self._by_name[entry.name] = entry

    def lookup(self, public_key: bytes) -> SiteEntry | None:
        """The entry for ``public_key`` (revoked entries included), or None if unknown."""
        return self._by_key.get(bytes(public_key))

    def by_name(self, name: str) -> SiteEntry | None:
        return self._by_name.get(name)

    @property
    def sites(self) -> tuple[SiteEntry, ...]:
        return tuple(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[SiteEntry]:
        return iter(self.sites)

    def __repr__(self) -> str:
        active = sum(not e.revoked for e in self._by_name.values())
        return f"Allowlist({len(self)} sites, {active} active)"


def _entry_label(index: int, raw: Any) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return f"site #{index} ({raw['name']!r})"
    return f"site #{index}"


def _parse_entry(index: int, raw: Any, problems: list[str]) -> SiteEntry | None:
    label = _entry_label(index, raw)
    if not isinstance(raw, dict):
        problems.append(f"{label}: expected a [[site]] table")
        return None
    before = len(problems)
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        problems.append(
            f"{label}: unknown field(s) {', '.join(unknown)} (allowed: name, public_key, revoked)"
        )
    name = raw.get("name")
    if name is None:
        problems.append(f"{label}: missing name")
    elif not isinstance(name, str) or not SITE_NAME_PATTERN.fullmatch(name):
        problems.append(
            f"{label}: invalid name; use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    key_text = raw.get("public_key")
    public_key = b""
    if key_text is None:
        problems.append(f"{label}: missing public_key")
    elif not isinstance(key_text, str):
        problems.append(f"{label}: public_key must be a base64 string")
    else:
        try:
            public_key = decode_public_key(key_text)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
    revoked = raw.get("revoked", False)
    if not isinstance(revoked, bool):
        problems.append(f"{label}: revoked must be true or false")
    if len(problems) > before:
        return None
    assert isinstance(name, str)
    return SiteEntry(name=name, public_key=public_key, revoked=revoked)


def parse_allowlist(text: str, *, source: str = "allowlist") -> Allowlist:
    """Parse allowlist TOML; one ConfigError lists every bad entry by number and name."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    problems: list[str] = []
    unknown = sorted(set(doc) - {"site"})
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)} (expected [[site]])")
    raw_sites = doc.get("site", [])
    if not isinstance(raw_sites, list):
        problems.append("'site' must be an array of tables: write each entry as [[site]]")
        raw_sites = []
    entries: list[SiteEntry] = []
    for index, raw in enumerate(raw_sites, start=1):
        entry = _parse_entry(index, raw, problems)
        if entry is not None:
            entries.append(entry)
    # Duplicates are reported by position in the file, so walk the raw entries again.
    first_by_name: dict[str, int] = {}
    first_by_key: dict[bytes, tuple[int, str]] = {}
    for index, raw in enumerate(raw_sites, start=1):
        if not isinstance(raw, dict):
            continue
        name = raw.get("name")
        if isinstance(name, str) and SITE_NAME_PATTERN.fullmatch(name):
            if name in first_by_name:
                problems.append(
                    f"site #{index} ({name!r}): name already used by site #{first_by_name[name]}"
                )
            else:
                first_by_name[name] = index
        key_text = raw.get("public_key")
        if isinstance(key_text, str):
            try:
                key = decode_public_key(key_text)
            except ValueError:
                continue
            if key in first_by_key:
                first_index, first_name = first_by_key[key]
                problems.append(
                    f"{_entry_label(index, raw)}: public_key {fingerprint(key)} already used by "
                    f"site #{first_index} ({first_name!r})"
                )
            else:
                first_by_key[key] = (index, str(name))
    if problems:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems))
    return Allowlist(entries)


def load_allowlist(path: str | Path) -> Allowlist:
    """Read and validate an allowlist TOML file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"allowlist file {source} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read allowlist file {source}: {exc}") from exc
    return parse_allowlist(text, source=str(source))


# ---------------------------------------------------------------------------------------------
# editing the allowlist file (fedlearn keys enroll / revoke)

_SITE_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*site[ \t]*\]\][ \t]*(?:#.*)?$", re.MULTILINE)
_REVOKED_LINE = re.compile(r"^([ \t]*revoked[ \t]*=[ \t]*)(true|false)\b(.*)$", re.MULTILINE)


def _replace_allowlist(path: Path, text: str, expected: list[SiteEntry]) -> None:
    """Write ``text`` over ``path`` atomically, once it parses to exactly ``expected``."""
    try:
        edited = parse_allowlist(text, source=str(path))
    except ConfigError:
        edited = None
    if edited is None or [(e.name, e.public_key, e.revoked) for e in edited.sites] != [
        (e.name, e.public_key, e.revoked) for e in expected
    ]:
        raise ConfigError(
            f"cannot edit {path} safely (its layout is not one [[site]] table per entry); "
            "edit it by hand"
        )
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    write_file_atomic(path, text.encode("utf-8"), mode=mode, overwrite=True)


def _read_allowlist_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"allowlist file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read allowlist file {path}: {exc}") from exc


def set_revoked(path: str | Path, name: str, revoked: bool = True) -> SiteEntry:
    """Set ``revoked`` on site ``name`` in the allowlist file and keep everything else (the
    other entries, their order, comments and layout); the file is replaced atomically, so
    a coordinator reading it sees the old or the new version, never a mix. Returns the
    entry as it was before."""
    source = Path(path)
    text = _read_allowlist_text(source)
    allowlist = parse_allowlist(text, source=str(source))
    entry = allowlist.by_name(name)
    if entry is None:
        listed = ", ".join(e.name for e in allowlist) or "none"
        raise ConfigError(f"site {name!r} is not in {source} (sites: {listed})")
    if entry.revoked == revoked:
        return entry
    value = "true" if revoked else "false"
    starts = [m.start() for m in _SITE_HEADER.finditer(text)]
    edited: str | None = None
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        block = text[begin:end]
        try:
            names = [s.get("name") for s in tomllib.loads(block).get("site", [])]
        except tomllib.TOMLDecodeError:
            continue
        if names != [name]:
            continue
        if _REVOKED_LINE.search(block):
            block = _REVOKED_LINE.sub(lambda m: f"{m[1]}{value}{m[3]}", block, count=1)
        else:  # after the entry's last key line, before trailing blank lines and comments
            lines = block.splitlines(keepends=True)
            last = max(
                i
                for i, line in enumerate(lines)
                if line.strip() and not line.lstrip().startswith("#")
            )
            if not lines[last].endswith("\n"):
                lines[last] += "\n"
            lines.insert(last + 1, f"revoked = {value}\n")
            block = "".join(lines)
        edited = text[:begin] + block + text[end:]
        break
    expected = [
        SiteEntry(e.name, e.public_key, revoked if e.name == name else e.revoked) for e in allowlist
    ]
    _replace_allowlist(source, edited if edited is not None else "", expected)
    return entry


def enroll_site(path: str | Path, name: str, public_key: bytes) -> SiteEntry:
    """Append site ``name`` with ``public_key`` to the allowlist file (created if missing),
    keeping what is there; the file is replaced atomically. A name or key already listed,
    revoked or not, is refused."""
    check_site_name(name)
    source = Path(path)
    text = _read_allowlist_text(source) if source.exists() else ""
    allowlist = parse_allowlist(text, source=str(source))
    if allowlist.by_name(name) is not None:
        raise ConfigError(f"site {name!r} is already in {source}; choose another name")
    other = allowlist.lookup(public_key)
    if other is not None:
        raise ConfigError(f"key {fingerprint(public_key)} is already enrolled as {other.name!r}")
    entry = SiteEntry(name, bytes(public_key))
    separator = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    _replace_allowlist(
        source,
        text + separator + allowlist_entry_toml(name, entry.public_key),
        [*allowlist.sites, entry],
    )
    return entry
