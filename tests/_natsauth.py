"""NATS servers that demand credentials or TLS, and the keys and certificates to meet them.

``make_pki`` makes a private CA, a server certificate for 127.0.0.1 and a client certificate with
the openssl CLI, and a second CA nobody trusts. ``Identities`` makes NKeys (with the nkeys
package) and the JWTs of decentralized auth: an operator, an account with JetStream, and a
user's ``.creds`` file, signed as nsc signs them. ``ConfiguredNats`` is a nats-server of one
test, started on a config file the test writes (authorization, TLS), with JetStream.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys

from tests.fix_faults import NATS_SERVER, START_TIMEOUT_S, free_port

OPENSSL = "/usr/bin/openssl"


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A private CA with a server and a client certificate; ``other_*`` from an unknown CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [OPENSSL, *args], cwd=cwd, check=True, capture_output=True, stdin=subprocess.DEVNULL
    )


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", key.name, "-out", cert.name, "-days", "2"),
        *("-subj", f"/CN=coleta test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )
    return cert, key


def _make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    (directory / f"{name}.ext").write_text(
        extensions + "\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}"),
        cwd=directory,
    )
    _openssl(
        *("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name),
        *("-CAcreateserial", "-out", cert.name, "-days", "2", "-extfile", f"{name}.ext"),
        cwd=directory,
    )
    return cert, key


def make_pki(directory: Path) -> Pki:
    ca = _make_ca(directory, "ca")
    other = _make_ca(directory, "other-ca")
    server = _make_leaf(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature",
    )
    client_ext = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature"
    client = _make_leaf(directory, "client", ca, client_ext)
    stranger = _make_leaf(directory, "stranger", other, client_ext)
    return Pki(ca[0], *server, *client, other[0], *stranger)


# --- NKeys and JWTs -------------------------------------------------------------------------


@dataclass(frozen=True)
class NKey:
    """An NKey pair: its seed (``S…``) and public key (``U…``, ``A…``, ``O…``)."""

    seed: str
    public: str

    @classmethod
    def generate(cls, prefix: int) -> NKey:
        seed = nkeys.encode_seed(os.urandom(32), prefix).decode()
        pair = nkeys.from_seed(bytearray(seed.encode()))
        return cls(seed, pair.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        signature: bytes = nkeys.from_seed(bytearray(self.seed.encode())).sign(data)
        return signature


def user_nkey() -> NKey:
    return NKey.generate(nkeys.PREFIX_BYTE_USER)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def encode_jwt(issuer: NKey, subject: str, name: str, nats: Mapping[str, Any]) -> str:
    """A NATS JWT (v2): ``ed25519-nkey`` signed by ``issuer``, as nsc writes them."""
    claims = {
        "jti": _b64(secrets.token_bytes(24)),
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": dict(nats),
    }
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def creds_file(path: Path, jwt: str, seed: str) -> Path:
    """A ``.creds`` file as nsc generates it."""
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Operator:
    """Decentralized auth: an operator, its system account, one account with JetStream, and
    that account's users."""

    operator: NKey
    system: NKey
    account: NKey
    operator_jwt: str
    system_jwt: str
    account_jwt: str

    @classmethod
    def generate(cls) -> Operator:
        operator = NKey.generate(nkeys.PREFIX_BYTE_OPERATOR)
        system = NKey.generate(nkeys.PREFIX_BYTE_ACCOUNT)
        account = NKey.generate(nkeys.PREFIX_BYTE_ACCOUNT)
        operator_jwt = encode_jwt(
            operator,
            operator.public,
            "test-operator",
            {"system_account": system.public, "type": "operator", "version": 2},
        )
        unlimited = dict.fromkeys(
            ("subs", "data", "payload", "imports", "exports", "conn", "leaf"), -1
        )
        jetstream = dict.fromkeys(("mem_storage", "disk_storage", "streams", "consumer"), -1)

        def account_jwt(key: NKey, name: str, limits: dict[str, Any]) -> str:
            return encode_jwt(
                operator,
                key.public,
                name,
                {
                    "limits": {**unlimited, **limits, "wildcards": True},
                    "default_permissions": {"pub": {}, "sub": {}},
                    "type": "account",
                    "version": 2,
                },
            )

        return cls(
            operator,
            system,
            account,
            operator_jwt,
            account_jwt(system, "SYS", {}),
            account_jwt(account, "coleta", jetstream),
        )

    def user_creds(self, path: Path, *, signer: NKey | None = None) -> Path:
        """A user of the account (or signed by ``signer``, an account the server ignores)."""
        user = user_nkey()
        issuer = signer or self.account
        jwt = encode_jwt(
            issuer,
            user.public,
            "coleta-daemon",
            {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
            | {"type": "user", "version": 2},
        )
        return creds_file(path, jwt, user.seed)

    def server_config(self) -> str:
        return (
            f"operator: {self.operator_jwt}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system.public}: {self.system_jwt}\n"
            f"  {self.account.public}: {self.account_jwt}\n"
            "}\n"
        )


# --- a nats-server on a config file ---------------------------------------------------------


@dataclass
class ConfiguredNats:
    """A nats-server of one test, with JetStream, on a config the test gave (auth, TLS)."""

    directory: Path
    config: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "nats-server.log"

    def start(self) -> None:
        conf = self.directory / "nats-server.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.directory / 'js'))} }}\n" + self.config
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(NATS_SERVER), "-c", str(conf)],
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nats-server exited:\n{self.log.read_text()[-3000:]}")
            if "Server is ready" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.02)
        raise AssertionError(f"nats-server not up in {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
