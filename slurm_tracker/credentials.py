"""The API key and the API's base URL: where the key is read from (a private file, the systemd
credential, the environment) and checked, and which host the agent talks to (``api.url``,
``$PW_PLATFORM_HOST``, or the host encoded in the key).

Apart from the HTTP transport (:mod:`slurm_tracker.api`, which re-exports these names for its
callers). The API key is never logged, shown in a ``repr`` or put in an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from slurm_tracker import errors, files
from slurm_tracker.config import is_loopback

API_KEY_ENV = "PW_API_KEY"
PLATFORM_HOST_ENV = "PW_PLATFORM_HOST"
KEY_PREFIX = "pwt_"
KEY_FILE_MAX_BYTES = 4096  # a key is one short line: a larger file is not a key file


def load_api_key(key_file: Optional[Path], environ: Mapping[str, str]) -> str:
    """The API key: from ``key_file``, ``$CREDENTIALS_DIRECTORY/api-key`` or ``$PW_API_KEY``.

    The first source that is configured wins; the others are not looked at:

    1. ``key_file`` (``api.api_key_file``): a regular file (not a link) owned by the user running
       slurm-tracker, neither readable nor writable by group or others, in a directory only that
       user or root can change; else :class:`errors.UnsafeFile`.
    2. ``$CREDENTIALS_DIRECTORY/api-key``, when that variable is set and the file exists: the
       credential systemd hands over (``LoadCredential=api-key:...``). systemd makes it mode
       0400, owned by root with an ACL that lets the service's user read it (``ls`` shows
       0440, group root) or, on file systems without ACLs, owned by the service's user; its
       directory is 0500 (0550 with the ACL), root's or the user's, on a read-only mount. So
       the credential must be a regular file (not a link) owned by us or root, writable by
       nobody else, readable by no other user (a group read bit only with group root), in a
       directory only we or root can change; else :class:`errors.UnsafeFile`. A directory
       without ``api-key`` falls through to the next source.
    3. ``$PW_API_KEY``.

    No message shows any of the key's content.
    """
    credentials_env, credential_name = "CREDENTIALS_DIRECTORY", "api-key"
    other_read, group_read = 0o004, 0o040
    credentials_dir = environ.get(credentials_env, "")
    credential = Path(credentials_dir) / credential_name if credentials_dir else None

    def read_credential(path: Path) -> Optional[str]:
        """The credential's stripped text, or None when there is no such file."""
        what = "API key credential"
        if not path.is_absolute():
            raise errors.ConfigError(
                f"${credentials_env}",
                [
                    f"${credentials_env} is not an absolute path: systemd sets it; "
                    "do not set it by hand"
                ],
            )
        files.check_directory(path.parent, f"{what} {path}")
        try:
            fd = files.open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, what)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise errors.ConfigError(
                str(path), [f"cannot read the {what} {path}: {exc.strerror or exc}"]
            ) from exc
        try:
            info = files.check_open_file(fd, path, what, owned_by_us=False)
            if info.st_mode & other_read or (info.st_mode & group_read and info.st_gid != 0):
                raise errors.UnsafeFile(
                    f"{what} {path} is readable by other users (mode "
                    f"{info.st_mode & 0o7777:04o}, group {info.st_gid}): systemd's "
                    "LoadCredential= makes it 0400; is the variable "
                    f"${credentials_env} set by hand?"
                )
            data = os.read(fd, KEY_FILE_MAX_BYTES + 1)
            while data and len(data) <= KEY_FILE_MAX_BYTES:
                more = os.read(fd, KEY_FILE_MAX_BYTES + 1 - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise errors.ConfigError(
                str(path), [f"cannot read the {what} {path}: {exc.strerror or exc}"]
            ) from exc
        finally:
            os.close(fd)
        if len(data) > KEY_FILE_MAX_BYTES:
            raise errors.ConfigError(
                str(path),
                [
                    f"the {what} {path} is larger than {KEY_FILE_MAX_BYTES} bytes: it should "
                    "hold only the key; does LoadCredential= name the right file?"
                ],
            )
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            # not chained: the decode error holds the file's bytes
            raise errors.ConfigError(str(path), [f"the {what} {path} is not UTF-8 text"]) from None

    from_credential = None
    if key_file is None and credential is not None:
        from_credential = read_credential(credential)
    if key_file is not None:
        source = str(key_file)
        key = _read_key_file(key_file)
        where = f"the API key file {key_file}"
    elif from_credential is not None:
        source = str(credential)
        key = from_credential
        where = f"the API key credential {credential} (systemd LoadCredential=)"
    else:
        source = f"${API_KEY_ENV}"
        key = environ.get(API_KEY_ENV, "").strip()
        if not key:
            raise errors.ConfigError(
                "<environment>",
                [
                    "no API key: set api.api_key_file in the configuration (a file of mode "
                    "0600 holding the key), or run under systemd with "
                    f"LoadCredential={credential_name}:/path/to/key"
                    + (
                        f" (${credentials_env} is set but has no {credential_name})"
                        if credential is not None
                        else ""
                    )
                    + f", or set the environment variable {API_KEY_ENV}"
                ],
            )
        where = source
    if not key:
        raise errors.ConfigError(source, [f"{where} is empty: put the API key in it"])
    if not _key_chars_ok(key):
        raise errors.ConfigError(
            source,
            [
                f"{where} does not hold one API key: it contains whitespace, ':' or "
                "non-ASCII characters; put only the key in it"
            ],
        )
    return key


def _read_key_file(path: Path) -> str:
    """The stripped text of the key file, checked like ssh's StrictModes (see files.py)."""
    what = "API key file"
    files.check_directory(path.parent, f"{what} {path}")
    try:
        # O_NONBLOCK: opening a FIFO put in the key's place must not hang the agent (it is
        # then refused as not a regular file); it changes nothing for a regular file.
        fd = files.open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, what)
    except OSError as exc:
        raise errors.ConfigError(
            str(path), [f"cannot read the API key file {path}: {exc.strerror or exc}"]
        ) from exc
    try:
        files.check_open_file(fd, path, what, owned_by_us=True, private=True)
        chunks: list[bytes] = []
        size = 0
        while size <= KEY_FILE_MAX_BYTES:
            chunk = os.read(fd, KEY_FILE_MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise errors.ConfigError(
            str(path), [f"cannot read the API key file {path}: {exc.strerror or exc}"]
        ) from exc
    finally:
        os.close(fd)
    if size > KEY_FILE_MAX_BYTES:
        raise errors.ConfigError(
            str(path),
            [
                f"the API key file {path} is larger than {KEY_FILE_MAX_BYTES} bytes: it should "
                "hold only the key; is it the right file?"
            ],
        )
    try:
        return b"".join(chunks).decode("utf-8").strip()
    except UnicodeDecodeError:
        # not chained: the decode error holds the file's bytes
        raise errors.ConfigError(
            str(path), [f"the API key file {path} is not UTF-8 text"]
        ) from None


def _key_chars_ok(key: str) -> bool:
    return all(33 <= ord(c) <= 126 for c in key) and ":" not in key


def derive_base_url(url: Optional[str], api_key: str, environ: Mapping[str, str]) -> str:
    """``api.url``, else ``$PW_PLATFORM_HOST``, else the host encoded in a ``pwt_`` key.

    Returns ``scheme://host[:port][/path]`` without a trailing slash. Plain http is refused
    unless the host is loopback (tests and local emulators).
    """
    if url:
        return _normalise_base(url, "api.url")
    host = environ.get(PLATFORM_HOST_ENV, "").strip()
    if host:
        return _normalise_base(host, f"${PLATFORM_HOST_ENV}")
    return _normalise_base(host_from_key(api_key), "the host encoded in the API key")


def host_from_key(api_key: str) -> str:
    """The host of a ``pwt_<base64url(host)>.<secret>`` key (padding may be absent)."""
    problem = (
        "cannot derive the API host from the API key: it is not of the form "
        f"{KEY_PREFIX}<base64url(host)>.<secret>; set api.url in the configuration or "
        f"${PLATFORM_HOST_ENV}"
    )
    encoded, dot, secret = api_key[len(KEY_PREFIX) :].partition(".")
    if not api_key.startswith(KEY_PREFIX) or not dot or not encoded or not secret:
        raise errors.ConfigError("<API key>", [problem])
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
        host = raw.decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise errors.ConfigError("<API key>", [problem]) from exc
    if not host or any(c.isspace() or not c.isprintable() for c in host):
        raise errors.ConfigError("<API key>", [problem])
    return host


def _normalise_base(text: str, source: str) -> str:
    text = text.strip()
    candidate = text if "://" in text else f"https://{text}"
    try:
        parts = urlsplit(candidate)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise errors.ConfigError(source, [f"{source} {text!r} is not a valid URL"]) from exc
    problems = []
    if parts.scheme not in ("https", "http"):
        problems.append(f"{source} {text!r}: use an https:// URL")
    if not hostname:
        problems.append(f"{source} {text!r} has no host name")
    if parts.query or parts.fragment or parts.username or parts.password:
        problems.append(
            f"{source} {text!r} must not contain a query, a fragment or credentials: "
            "give https://host only"
        )
    if not problems and parts.scheme == "http" and not is_loopback(hostname or ""):
        problems.append(
            f"{source} {text!r} uses plain http, which would send the API key unencrypted: "
            "use https:// (http is allowed for loopback hosts only)"
        )
    if problems:
        raise errors.ConfigError(source, problems)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
