"""TLS for both doors and for the peers Postbox connects to: SSL contexts from config, and test certificates.

``postbox manage certs DIR`` makes a private CA with a server and a client certificate for a test
deployment (the ``cryptography`` package); a hospital uses its own PKI instead. Contexts refuse anything
older than TLS 1.2.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

CERT_FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem", "node.pem",
              "node-key.pem")


@dataclass(frozen=True)
class TlsFiles:
    """The files of one TLS end, as absolute paths (the config resolves them against its own folder)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    def server_context(self) -> ssl.SSLContext:
        """A context for a door: our certificate, and the CA that client certificates must come from."""
        if self.cert is None or self.key is None:
            raise ConfigError("tls", "a door serving TLS needs both cert and key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        # No TLS 1.3 session tickets: neither DICOM peers nor our HTTP clients resume sessions, and the ticket
        # written after the handshake held the first answer behind Nagle until the peer's delayed ACK (+40 ms
        # on each DICOM association set-up, measured).
        ctx.num_tickets = 0
        if self.ca is not None:
            ctx.load_verify_locations(str(self.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        elif self.require_client_cert:
            raise ConfigError("tls.require_client_cert", "needs tls.ca, the CA client certificates come from")
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A context for connecting out: the peer is checked against ``ca`` (or the system's), by host name."""
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def make_certificates(folder: Path, hosts: list[str], *, days: int = 825) -> list[Path]:
    """Write a private CA, a server certificate for ``hosts`` and a client certificate into ``folder``.

    Keys are written 0600. Returns the files written (``CERT_FILES``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Postbox"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Postbox test CA")).issuer_name(name("Postbox test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_key(folder / "ca-key.pem", ca_key)

    def alt_name(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    # A Dask cluster's node (scheduler, GPU worker, the service as its client) both listens and connects with
    # one certificate (engine.dask.tls), so it needs both usages.
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for role, usages in (("server", [ExtendedKeyUsageOID.SERVER_AUTH]), ("client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
                         ("node", both)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(hosts[0] if role != "client" else "postbox-client"))
                   .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if role != "client":
            builder = builder.add_extension(x509.SubjectAlternativeName([alt_name(h) for h in hosts]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (folder / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(folder / f"{role}-key.pem", key)
    return [folder / f for f in CERT_FILES]
