"""NATS authentication and TLS, as the nats CLI does them, against real nats-servers.

Each server here is a nats-server of one test started on a config it writes (``_natsauth``):
a user and password, an NKey user, decentralized auth with a ``.creds`` file (operator,
account and user JWTs made here), TLS with a private CA on a ``tls://`` URL, and mutual TLS.
For each, the daemon connects (in-process with config keys, as a process with natscli's
variables) and a run lands; the CLI answers with the variables; wrong credentials or an
untrusted CA are one line naming the server and the reason, and exit 3 at once. Then the
shipped ``ops/nats/authorization.conf``: the daemon collects with only its own rights, the
viewer reads but cannot trigger, the operator triggers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import nats
import nats.errors
import nkeys
import psycopg
import pytest
from psycopg.rows import TupleRow

from daemon.app import open_daemon
from daemon.errors import EXIT_UNREACHABLE, BusUnavailable, ConfigError
from daemon.platform.bus._connect import connect_nats
from daemon.platform.nats_auth import NatsAuth
from daemon.settings import NATS_ENV, load_settings
from tests import ROOT
from tests._collect import finished, source
from tests._natsauth import ConfiguredNats, NKey, Operator, Pki, make_pki, user_nkey
from tests._proc import clean_env, coleta
from tests.fix_daemon import MakeSettings, wait_for
from tests.fix_faults import DaemonFactory, DaemonProcess, eventually
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

#: A refusal is final: the daemon stops long before this connect timeout.
CONNECT_TIMEOUT_S = 30
GRACE_S = 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def configured_nats(tmp_path: Path) -> Iterator[Callable[..., ConfiguredNats]]:
    """``start(config, **env)`` → a running nats-server of this test; stopped afterwards."""
    started: list[ConfiguredNats] = []

    def start(config: str, **env: str) -> ConfiguredNats:
        directory = tmp_path / f"nats-{len(started)}"
        directory.mkdir()
        server = ConfiguredNats(directory, config, env)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@dataclass(frozen=True)
class Secured:
    """A server that demands something, what satisfies it, and what it refuses (as natscli
    variables; the same settings as config keys in ``keys``)."""

    name: str
    url: str
    env: dict[str, str]
    wrong: dict[str, str]
    #: The end of the one error line a refusal gives.
    reason: str
    server: ConfiguredNats = field(repr=False)

    @property
    def keys(self) -> dict[str, str]:
        return {NATS_ENV[var]: value for var, value in self.env.items()}

    @property
    def auth(self) -> NatsAuth:
        return NatsAuth(**{key.removeprefix("nats_"): value for key, value in self.keys.items()})


MODES = ["password", "nkey", "creds", "tls", "mtls"]


def _seed_file(path: Path, key: NKey) -> str:
    path.write_text(key.seed + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(params=MODES)
def secured(
    request: pytest.FixtureRequest,
    pki: Pki,
    configured_nats: Callable[..., ConfiguredNats],
    tmp_path: Path,
) -> Secured:
    name: str = request.param
    users = 'authorization { users: [ {user: "coleta", password: "pw-right"} ] }\n'
    password = {"NATS_USER": "coleta", "NATS_PASSWORD": "pw-right"}
    tls = f"tls {{ cert_file: {json.dumps(str(pki.server_cert))}"
    tls += f", key_file: {json.dumps(str(pki.server_key))}"
    if name == "password":
        server = configured_nats(users)
        wrong = password | {"NATS_PASSWORD": "pw-wrong"}
        return Secured(
            name,
            server.url,
            password,
            wrong,
            "refused user 'coleta': authorization violation",
            server,
        )
    if name == "nkey":
        user = user_nkey()
        server = configured_nats(f"authorization {{ users: [ {{nkey: {user.public}}} ] }}\n")
        stranger = _seed_file(tmp_path / "stranger.nk", user_nkey())
        return Secured(
            name,
            server.url,
            {"NATS_NKEY": _seed_file(tmp_path / "user.nk", user)},
            {"NATS_NKEY": stranger},
            f"refused the NKey in {stranger}: authorization violation",
            server,
        )
    if name == "creds":
        operator = Operator.generate()
        server = configured_nats(operator.server_config())
        unknown_account = NKey.generate(nkeys.PREFIX_BYTE_ACCOUNT)
        creds = operator.user_creds(tmp_path / "stranger.creds", signer=unknown_account)
        return Secured(
            name,
            server.url,
            {"NATS_CREDS": str(operator.user_creds(tmp_path / "user.creds"))},
            {"NATS_CREDS": str(creds)},
            f"refused the credentials in {creds}: authorization violation",
            server,
        )
    if name == "tls":  # a private CA, on a tls:// URL, with a user and password inside
        server = configured_nats(tls + " }\n" + users)
        return Secured(
            name,
            server.tls_url,
            password | {"NATS_CA": str(pki.ca)},
            password | {"NATS_CA": str(pki.other_ca)},
            "has a certificate that does not verify (certificate verify failed: unable to get"
            f" local issuer certificate; trusting the CA in {pki.other_ca})",
            server,
        )
    assert name == "mtls"
    return mutual_tls(pki, configured_nats)


def mutual_tls(pki: Pki, configured_nats: Callable[..., ConfiguredNats]) -> Secured:
    """Client certificates required; a nats:// URL: NATS_CA makes it TLS."""
    tls = f"tls {{ cert_file: {json.dumps(str(pki.server_cert))}"
    tls += f", key_file: {json.dumps(str(pki.server_key))}"
    server = configured_nats(tls + f", ca_file: {json.dumps(str(pki.ca))}, verify: true }}\n")
    client = {"NATS_CA": str(pki.ca), "NATS_CERT": str(pki.client_cert)}
    client["NATS_KEY"] = str(pki.client_key)
    other = {"NATS_CERT": str(pki.other_client_cert), "NATS_KEY": str(pki.other_client_key)}
    return Secured(
        "mtls",
        server.url,
        client,
        client | other,
        f"refused the client certificate {pki.other_client_cert}: TLSV1_ALERT_UNKNOWN_CA",
        server,
    )


def config_toml(api: LocalAPI, prefix: str, schema: str, **top: Any) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in top.items()]
    lines += [
        f'bus_prefix = "{prefix}"',
        f'database_schema = "{schema}"',
        f"shutdown_grace_s = {GRACE_S}",
        f"connect_timeout_s = {CONNECT_TIMEOUT_S}",
        "[[sources]]",
        'name = "secured"',
        f'url = "{api.url("/secured")}"',
        'schedule = "0 0 1 1 *"',
    ]
    return "\n".join(lines) + "\n"


async def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``coleta ARGS`` in a thread: the event loop keeps serving whatever the test runs."""
    return await anyio.to_thread.run_sync(lambda: coleta(*args, env=env))


async def exit_code(daemon: DaemonProcess, within_s: float = 30) -> tuple[int, float]:
    """The daemon's exit code, and how long after its start it came."""
    assert daemon.process is not None
    process, started = daemon.process, time.monotonic()
    code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=within_s))
    return code, time.monotonic() - started


# --- each kind of authentication: the daemon and the CLI get in ---------------------------


async def test_daemon_in_process_collects_with_the_config_keys(
    secured: Secured, api: LocalAPI, make_settings: MakeSettings, bus_prefix: str, db_conn: Any
) -> None:
    api.route("/secured", json={"mode": secured.name})
    settings = make_settings(
        [source(api, "secured", "/secured")], nats_url=secured.url, **secured.keys
    )
    async with open_daemon(settings):
        nc = await nats.connect(
            secured.url, connect_timeout=5, allow_reconnect=False, **client_options(secured)
        )
        try:
            reply = await nc.request(f"{bus_prefix}.trigger", b"secured", timeout=10)
        finally:
            await nc.close()
        run_id = msgspec.json.decode(reply.data)["run_id"]
        row = await wait_for(lambda: finished(db_conn, run_id), what=f"run {run_id}")
    assert row["status"] == "stored"
    assert row["rows"] == 1


def client_options(secured: Secured) -> dict[str, Any]:
    """nats-py's own options for a test client (not coleta's code)."""
    env = secured.env
    options: dict[str, Any] = {}
    if "NATS_USER" in env:
        options |= {"user": env["NATS_USER"], "password": env["NATS_PASSWORD"]}
    if "NATS_NKEY" in env:
        options["nkeys_seed"] = env["NATS_NKEY"]
    if "NATS_CREDS" in env:
        options["user_credentials"] = env["NATS_CREDS"]
    if "NATS_CA" in env:
        context = ssl.create_default_context(cafile=env["NATS_CA"])
        if "NATS_CERT" in env:
            context.load_cert_chain(env["NATS_CERT"], env["NATS_KEY"])
        options["tls"] = context
    return options


async def test_daemon_process_and_cli_with_natscli_variables(
    secured: Secured,
    api: LocalAPI,
    daemon_processes: DaemonFactory,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    api.route("/secured", json={"mode": secured.name})
    env = {"NATS_URL": secured.url, "DATABASE_URL": database_url, **secured.env}
    daemon = daemon_processes("daemon", config_toml(api, bus_prefix, db_schema), **env)
    daemon.start()
    await daemon.wait_ready()
    client = clean_env(NATS_URL=secured.url, COLETA_BUS_PREFIX=bus_prefix, **secured.env)

    health = await cli("health", env=client)
    assert (health.returncode, health.stdout) == (0, "ok\n"), health.stderr
    status = await cli("status", env=client)
    assert status.returncode == 0, status.stderr
    assert "bus ok  database ok" in status.stdout
    triggered = await cli("trigger", "secured", "--wait", "--wait-timeout", "30", env=client)
    assert triggered.returncode == 0, triggered.stderr
    assert "stored: 1 rows" in triggered.stdout

    assert daemon.kill(signal.SIGTERM) == 0


async def test_refused_credentials_are_one_line_and_exit_3_at_once(
    secured: Secured,
    api: LocalAPI,
    daemon_processes: DaemonFactory,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    env = {"NATS_URL": secured.url, "DATABASE_URL": database_url, **secured.wrong}
    daemon = daemon_processes("refused", config_toml(api, bus_prefix, db_schema), **env)
    daemon.start()
    code, took = await exit_code(daemon)

    assert code == EXIT_UNREACHABLE, daemon.tail()
    # Refused is final: no waiting out connect_timeout_s (30 s) for the same answer.
    assert took < 10, f"exited after {took:.1f} s"
    errors = [event for event in daemon.events() if event.get("level") == "error"]
    assert len(errors) == 1, daemon.tail()
    message = errors[0]["error"]
    assert secured.url in message, message
    assert message.endswith(secured.reason), message
    assert "Traceback" not in daemon.tail(200)

    started = time.monotonic()
    health = await cli("health", env=clean_env(NATS_URL=secured.url, **secured.wrong))
    assert health.returncode == EXIT_UNREACHABLE
    assert health.stderr.startswith("coleta: "), health.stderr
    assert health.stderr.count("\n") == 1, health.stderr
    assert health.stderr.rstrip("\n").endswith(secured.reason), health.stderr
    assert time.monotonic() - started < 5  # its --timeout: refused before it


async def test_cli_sees_a_refusal_behind_connections_reset_first(
    pki: Pki, configured_nats: Callable[..., ConfiguredNats]
) -> None:
    """A server that resets a connection is there and closing on us (a TLS 1.3 server that
    refuses a client certificate often resets the client before its alert can be read): the
    CLI tries again within its --timeout instead of giving up after nats-py's two attempts."""
    secured = mutual_tls(pki, configured_nats)
    host, port = secured.url.removeprefix("nats://").rsplit(":", 1)
    resets = 0

    async def relay(client: anyio.abc.SocketStream) -> None:
        nonlocal resets
        async with client:
            if resets < 4:  # more than nats-py's own attempts in one connect
                resets += 1
                raw = client.extra(anyio.abc.SocketAttribute.raw_socket)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            async with await anyio.connect_tcp(host, int(port)) as server:

                async def pump(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        async for chunk in a:
                            await b.send(chunk)
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await b.send_eof()

                async with anyio.create_task_group() as pumps:
                    pumps.start_soon(pump, client, server)
                    pumps.start_soon(pump, server, client)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy = f"nats://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as serving:
        serving.start_soon(listener.serve, relay)
        health = await cli("health", env=clean_env(NATS_URL=proxy, **secured.wrong))
        serving.cancel_scope.cancel()
    assert resets == 4
    assert health.returncode == EXIT_UNREACHABLE, health.stderr
    assert health.stderr.count("\n") == 1, health.stderr
    assert health.stderr.rstrip("\n").endswith(secured.reason), health.stderr


async def test_bus_connect_stops_at_the_first_refusal(secured: Secured) -> None:
    wrong = {NATS_ENV[var].removeprefix("nats_"): value for var, value in secured.wrong.items()}
    started = time.monotonic()
    with pytest.raises(BusUnavailable) as caught:
        await connect_nats(secured.url, 60.0, NatsAuth(**wrong))
    assert caught.value.code == "bus_refused"
    assert str(caught.value).endswith(secured.reason)
    assert time.monotonic() - started < 5  # not the 60 s timeout


# --- config keys, files and secrets ---------------------------------------------------------


async def test_nats_password_is_a_secret_reference_and_nats_password_wins(
    tmp_path: Path, configured_nats: Callable[..., ConfiguredNats], bus_prefix: str
) -> None:
    server = configured_nats('authorization { users: [ {user: "coleta", password: "pw"} ] }\n')
    path = tmp_path / "coleta.toml"
    path.write_text(
        f'nats_url = "{server.url}"\nnats_user = "coleta"\nnats_password = {{ secret = "nats" }}\n'
    )
    settings = load_settings(path, env={"COLETA_SECRET_NATS": "pw"})
    assert settings.nats_password == "pw"
    assert "pw" not in repr(settings)
    nc = await connect_nats(server.url, 10, settings.nats_auth())
    await nc.close()
    # The variable wins over the file, even over a secret that cannot be found.
    assert load_settings(path, env={"NATS_PASSWORD": "from-env"}).nats_password == "from-env"

    path.write_text(f'nats_url = "{server.url}"\nnats_user = "coleta"\nnats_password = "pw"\n')
    with pytest.raises(ConfigError, match="nats_password: an inline secret is not allowed"):
        load_settings(path, env={})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"nats_cert": "/c.pem"}, "nats_key: mutual TLS needs both nats_cert and nats_key"),
        ({"nats_password": "x"}, "nats_password: needs nats_user (NATS_USER)"),
        (
            {"nats_user": "u", "nats_creds": "/u.creds"},
            "nats_creds: give one of nats_user, nats_creds or nats_nkey",
        ),
    ],
)
def test_inconsistent_nats_keys_name_the_key(
    make_settings: MakeSettings, keys: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        make_settings([], **keys)


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ("NATS_CREDS", "nats_creds (NATS_CREDS): cannot read {path}: No such file or directory"),
        ("NATS_NKEY", "nats_nkey (NATS_NKEY): {path} is not an NKey seed"),
        ("NATS_CA", "nats_ca (NATS_CA): cannot use {path}"),
    ],
)
def test_an_unusable_credential_file_is_exit_2_naming_it(
    tmp_path: Path, var: str, expected: str
) -> None:
    path = tmp_path / "bad"
    if var != "NATS_CREDS":
        path.write_text("not a key\n")
    result = coleta("health", env=clean_env(NATS_URL="nats://127.0.0.1:9", **{var: str(path)}))
    assert result.returncode == 2
    assert result.stderr.startswith(f"coleta: {expected.format(path=path)}"), result.stderr
    assert result.stderr.count("\n") == 1


# --- TLS is compulsory when asked for, and a signal still stops a waiting daemon ---------


async def test_a_tls_url_never_sends_credentials_in_plain_text() -> None:
    """A server (or a man in the middle) that does not ask for TLS gets no CONNECT at all."""
    received = bytearray()

    async def plain_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            info = {"server_id": "plain", "version": "2.10.0", "proto": 1, "max_payload": 1024}
            await stream.send(f"INFO {json.dumps(info)}\r\n".encode())
            try:
                while chunk := await stream.receive():
                    received.extend(chunk)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, plain_server)
        result = await cli(
            "health",
            "--server",
            f"tls://127.0.0.1:{port}",
            env=clean_env(NATS_USER="coleta", NATS_PASSWORD="never-in-clear"),
        )
        tg.cancel_scope.cancel()

    assert result.returncode == EXIT_UNREACHABLE
    assert result.stderr == (
        f"coleta: NATS at tls://127.0.0.1:{port} does not offer TLS,"
        " which the tls:// URL requires\n"
    )
    assert b"CONNECT" not in received
    assert b"never-in-clear" not in received


async def test_sigterm_while_a_tls_handshake_hangs_stops_at_once(
    daemon_processes: DaemonFactory,
    api: LocalAPI,
    pki: Pki,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    """A server that asks for TLS and then never answers the handshake: the daemon waits
    (nats-py's connect timeout, then a retry), and SIGTERM stops it at once, exit 0."""
    hello = anyio.Event()

    async def stalling_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            info = {"server_id": "stall", "version": "2.10.0", "proto": 1, "tls_required": True}
            await stream.send(f"INFO {json.dumps(info)}\r\n".encode())
            try:
                while await stream.receive():
                    hello.set()  # the ClientHello, never answered
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    url = f"tls://127.0.0.1:{port}"
    config = config_toml(
        api,
        bus_prefix,
        db_schema,
        nats_url=url,
        database_url=database_url,
        nats_ca=str(pki.ca),
        nats_user="coleta",
    )
    config = config.replace("[[sources]]", 'nats_password = { secret = "nats" }\n[[sources]]', 1)
    daemon = daemon_processes("stalled", config, COLETA_SECRET_NATS="pw")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, stalling_server)
        daemon.start()
        with anyio.fail_after(20):
            await hello.wait()
        assert daemon.process is not None
        process, started = daemon.process, time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=20))
        took = time.monotonic() - started
        tg.cancel_scope.cancel()

    assert code == 0, daemon.tail()
    assert took < GRACE_S + 5, f"SIGTERM took {took:.1f} s"
    (line,) = daemon.events("daemon.signal")
    assert line["waiting_for"].startswith(f"NATS at {url}"), line


# --- ops/nats/authorization.conf: three roles ---------------------------------------------


ROLES = {
    "daemon": ("coleta-daemon", "COLETA_NATS_DAEMON_PASSWORD"),
    "operator": ("coleta-operator", "COLETA_NATS_OPERATOR_PASSWORD"),
    "viewer": ("coleta-viewer", "COLETA_NATS_VIEWER_PASSWORD"),
}


@pytest.fixture
def ops_nats(tmp_path: Path) -> Iterator[ConfiguredNats]:
    """A nats-server on the shipped authorization file, as is (its bus prefix is coleta)."""
    passwords = {var: os.urandom(12).hex() for _, var in ROLES.values()}
    # nats-server resolves `include` beside the including file: the shipped file, copied.
    directory = tmp_path / "nats-0"
    directory.mkdir()
    text = (ROOT / "ops" / "nats" / "authorization.conf").read_text()
    (directory / "authorization.conf").write_text(text)
    server = ConfiguredNats(directory, "include ./authorization.conf\n", passwords)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def role_auth(server: ConfiguredNats, role: str) -> dict[str, str]:
    user, var = ROLES[role]
    return {"user": user, "password": server.env[var]}


async def ask(
    server: ConfiguredNats, role: str, subject: str, body: bytes
) -> tuple[Any, list[str]]:
    """The reply (None: none came) and the errors the server sent to ``role``."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url,
        connect_timeout=5,
        allow_reconnect=False,
        error_cb=on_error,
        **role_auth(server, role),
    )
    try:
        try:
            reply = await nc.request(subject, body, timeout=2)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None, errors
        return msgspec.json.decode(reply.data), errors
    finally:
        await nc.close()


async def test_ops_authorization_gives_each_role_only_its_rights(
    ops_nats: ConfiguredNats,
    api: LocalAPI,
    make_settings: MakeSettings,
    db_conn: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon runs whole collections as coleta-daemon (no superuser): a small body, one
    larger than NATS takes (through the object store), a 404 (dead-lettered), two runs of one
    source at once (the second deferred). The viewer reads
    status, runs and health but its trigger is refused; the operator triggers."""
    caplog.set_level(logging.INFO, logger="coleta.fetcher")
    api.route("/secured", json={"roles": True})
    api.route("/big", json={"blob": "x" * (1536 * 1024)})
    api.route("/gone", status=404, json={"error": "gone"})
    held = threading.Event()  # the first slow run answers once the second is deferred
    api.route("/slow", json={"slow": True}, gate=held)
    daemon = role_auth(ops_nats, "daemon")
    settings = make_settings(
        [
            source(api, "secured", "/secured"),
            source(api, "big", "/big"),
            source(api, "gone", "/gone"),
            source(api, "slow", "/slow"),
        ],
        nats_url=ops_nats.url,
        bus_prefix="coleta",  # the file's prefix; this server is the test's alone
        nats_user=daemon["user"],
        nats_password=daemon["password"],
    )
    async with open_daemon(settings):
        for endpoint in ("status", "runs", "health"):
            reply, errors = await ask(ops_nats, "viewer", f"coleta.{endpoint}", b"")
            assert reply is not None, (endpoint, errors)
            assert errors == []
        assert (await ask(ops_nats, "viewer", "coleta.health", b""))[0]["status"] == "ok"

        refused, errors = await ask(ops_nats, "viewer", "coleta.trigger", b"secured")
        assert refused is None
        assert any("permissions violation for publish" in e.lower() for e in errors), errors
        assert "coleta.trigger" in " ".join(errors)

        triggered, errors = await ask(ops_nats, "operator", "coleta.trigger", b"secured")
        assert triggered is not None, errors
        run_id = triggered["run_id"]
        row = await wait_for(lambda: finished(db_conn, run_id), what=f"run {run_id}")
        assert row["status"] == "stored"
        assert row["rows"] == 1

        big, errors = await ask(ops_nats, "operator", "coleta.trigger", b"big")
        assert big is not None, errors
        row = await wait_for(lambda: finished(db_conn, big["run_id"]), what="the big run")
        assert row["status"] == "stored"
        assert row["bytes"] > 1024 * 1024
        gone, errors = await ask(ops_nats, "operator", "coleta.trigger", b"gone")
        assert gone is not None, errors
        row = await wait_for(lambda: finished(db_conn, gone["run_id"]), what="the 404 run")
        assert row["status"] == "failed"

        async def dead_letters() -> int:
            status, _ = await ask(ops_nats, "viewer", "coleta.status", b"")
            (entry,) = [src for src in status["sources"] if src["name"] == "gone"]
            return int(entry["dead_letters"])

        assert await eventually(dead_letters, what="the 404's dead letter") == 1

        # Two runs of one source at once: the second waits on the deferred stream.
        slots = ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
        run_ids = []
        for slot in slots:
            body = msgspec.json.encode({"source": "slow", "scheduled_for": slot})
            slow, errors = await ask(ops_nats, "operator", "coleta.trigger", body)
            assert slow is not None, errors
            run_ids.append(slow["run_id"])
            await wait_for(lambda: api.hits("/slow"), what="the first slow run fetching")
        await wait_for(
            lambda: "fetch.deferred" in [record.getMessage() for record in caplog.records],
            what="the second slow run deferred",
        )
        held.set()
        for run_id in run_ids:
            row = await wait_for(functools.partial(finished, db_conn, run_id), what=run_id)
            assert row["status"] == "stored"

        # Neither CLI role can publish where the daemon does.
        _, errors = await ask(ops_nats, "operator", "coleta.collect.secured", b"{}")
        assert any("permissions violation" in e.lower() for e in errors), errors
    (runs,) = db_conn.execute("SELECT count(*) FROM collection_runs").fetchall()
    assert runs == (5,)  # the viewer's trigger never reached the daemon
    violations = [line for line in ops_nats.log.read_text().splitlines() if "Violation" in line]
    assert [line for line in violations if "user:coleta-viewer" in line], violations
    assert not [line for line in violations if "user:coleta-daemon" in line], violations
