"""The server's TLS context: TLS 1.2 or later, forward-secret AEAD ciphers, optional mTLS.

uvicorn's own ``ssl_*`` options cannot set a minimum protocol version, so the context is built
here and handed to uvicorn whole (``TlsConfig``). Defaults a public deployment can keep:

- TLS 1.2 and 1.3 only; 1.0, 1.1 and SSLv3 are refused in the handshake;
- on TLS 1.2, only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (forward secret, AEAD);
  TLS 1.3's suites are all of that kind already;
- no TLS compression, no renegotiation, the server's cipher order.

Client certificates (mTLS): ``ssl_ca_certs`` names the CAs a client certificate must chain to;
``ssl_client_cert = "required"`` refuses a client without a valid one in the handshake,
``"optional"`` verifies a certificate when one is sent and lets clients without one in.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from embedplex.config import Settings

# OpenSSL cipher string for TLS 1.2: ECDHE key exchange, AEAD bulk ciphers, nothing else.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_VERIFY = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of ``settings``' certificate, or None when TLS is off."""
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    _load_files(context, settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_ca_certs)
    context.verify_mode = _VERIFY[settings.ssl_client_cert]
    return context


class TlsFileError(ValueError):
    """A TLS file missing, unreadable or not matching: the message names the file(s)."""


def _load_files(context: ssl.SSLContext, cert: Path, key: Path, ca: Path | None) -> None:
    """Load the certificate, its key and the client CAs, or say which file is wrong (an
    OpenSSL error alone, "[SSL] PEM lib", names none)."""
    for name, path in (("ssl_certfile", cert), ("ssl_keyfile", key), ("ssl_ca_certs", ca)):
        if path is not None and not Path(path).is_file():
            raise TlsFileError(f"{name} {path}: no such file")
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(
            f"ssl_certfile {cert} and ssl_keyfile {key} do not load as a certificate and its "
            f"key ({_why(exc)})"
        ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(f"ssl_ca_certs {ca}: not CA certificates ({_why(exc)})") from None


def _why(exc: OSError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc)


class TlsConfig(uvicorn.Config):
    """uvicorn's config, serving with our context instead of the one uvicorn would build.

    ``ssl_certfile``/``ssl_keyfile`` are still passed to uvicorn: they make it speak https
    (the ``scheme`` of requests); ``load`` then swaps in ``context``.
    """

    def __init__(self, app: Any, *, context: ssl.SSLContext | None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._context = context

    def load(self) -> None:
        super().load()
        if self._context is not None:
            self.ssl = self._context
