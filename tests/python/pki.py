"""Certificates made in the test: a CA and leaves it signs, written as PEM files."""
import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder):
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Ca:
    def __init__(self, directory: pathlib.Path, name: str):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        builder = _validity(x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                            .public_key(self.key.public_key()).serial_number(x509.random_serial_number()))
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        cert = builder.sign(self.key, hashes.SHA256())
        self.cert = directory / f"{name}.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, file: str, names, serial: int, rsa_key=False):
        """A certificate valid for `names` (DNS names or IPs) as server and client; returns
        (cert path, key path)."""
        key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
        sans = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = _validity(x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(self.name)
                            .public_key(key.public_key()).serial_number(serial))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{file}.pem", self.dir / f"{file}.key"
        key_path.write_bytes(_pem_key(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path
