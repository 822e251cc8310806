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
    context.load_cert_chain(str(settings.ssl_certfile), str(settings.ssl_keyfile))
    if settings.ssl_ca_certs is not None:
        context.load_verify_locations(cafile=str(settings.ssl_ca_certs))
    context.verify_mode = _VERIFY[settings.ssl_client_cert]
    return context


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
