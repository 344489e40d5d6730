"""Real Redis servers for the tests: standalone (optionally with a password, persistence or a memory
limit) and a 3-master cluster, on loopback ports, in a test's temporary directory."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import time

import pytest


def redis_bin(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's redis-server (scripts/ensure-redis.sh; .ci/run and "
                    "`make test` run it)")
    return path


_STARTED: list[subprocess.Popen] = []  # killed at exit, whatever a failing test left behind
atexit.register(lambda: [p.kill() for p in _STARTED if p.poll() is None])


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node one whose bus port (+10000) is free too (<= 55535)."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `kill()` is SIGKILL, `start()` brings it back on the same port and files."""

    def __init__(self, workdir: str, *, password: str | None = None, appendonly: bool = False,
                 maxmemory: str | None = None, cluster: bool = False, port: int | None = None,
                 tls: bool = False):
        self.port = port or free_port(cluster)
        self.dir = os.path.join(workdir, f"redis-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        self.password = password
        self.tls = tls
        listen = ["--port", "0", "--tls-port", str(self.port)] + self._certificates() if tls else ["--port", str(self.port)]
        self.args = [redis_bin(), *listen, "--bind", "127.0.0.1", "--dir", self.dir,
                     "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always",
                     "--logfile", os.path.join(self.dir, "server.log"), "--protected-mode", "no"]
        if password:
            self.args += ["--requirepass", password]
        if maxmemory:
            self.args += ["--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
        if cluster:
            self.args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                          "--cluster-node-timeout", "2000"]
        self.proc: subprocess.Popen | None = None
        self.start()

    def _certificates(self) -> list[str]:
        """A throw-away CA and a server certificate for 127.0.0.1 (openssl), in the server's directory."""
        d = self.dir
        sh = (f"cd '{d}' && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 "
              "-subj /CN=ucm-test-ca && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr "
              "-subj /CN=127.0.0.1 && printf 'subjectAltName=IP:127.0.0.1\\n' > ext.cnf && openssl x509 -req "
              "-in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf")
        subprocess.run(sh, shell=True, check=True, capture_output=True)
        self.ca_file = os.path.join(d, "ca.crt")
        return ["--tls-cert-file", os.path.join(d, "server.crt"), "--tls-key-file", os.path.join(d, "server.key"),
                "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _STARTED.append(self.proc)
        deadline = time.monotonic() + 15
        while not (self._tls_ping() if self.tls else _ping(self.port, self.password)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = open(os.path.join(self.dir, "server.log")).read()[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.05)

    def _tls_ping(self) -> bool:
        return self.cli("ping").strip() == "PONG"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart_command(self, settle_s: float = 0.0) -> str:
        """A shell command that starts this server again (daemonized, same port and files), waits until
        it answers, then `settle_s` more seconds. For a hook run by another process; `shutdown()` stops
        it."""
        args = " ".join(f"'{a}'" for a in self.args)
        ping = f"{redis_bin('redis-cli')} -p {self.port} ping"
        return (f"{args} --daemonize yes --pidfile '{self.dir}/pid' && for i in $(seq 150); do "
                f"{ping} 2>/dev/null | grep -q PONG && break; sleep 0.1; done && sleep {settle_s}")

    def shutdown(self) -> None:
        """Stop the server however it was started (this object's process or a daemon on its port)."""
        self.kill()
        self.cli("shutdown", "nosave")

    def cli(self, *args: str) -> str:
        tls = ["--tls", "--cacert", self.ca_file] if self.tls else []
        cmd = [redis_bin("redis-cli"), "-p", str(self.port), *tls] + (["--no-auth-warning", "-a", self.password]
                                                                if self.password else []) + list(args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


class RedisCluster:
    """Three masters on loopback ports, slots spread by `redis-cli --cluster create`."""

    def __init__(self, workdir: str):
        self.nodes: list[RedisServer] = []
        try:
            self._create(workdir)
        except BaseException:
            self.kill()
            raise

    def _create(self, workdir: str) -> None:
        for _ in range(3):
            self.nodes.append(RedisServer(workdir, cluster=True))
        out = subprocess.run([redis_bin("redis-cli"), "--cluster", "create"]
                             + [f"127.0.0.1:{n.port}" for n in self.nodes] + ["--cluster-replicas", "0",
                                                                               "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"cluster create failed:\n{out.stdout}\n{out.stderr}")
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach state ok")
            time.sleep(0.1)

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{n.port}" for n in self.nodes]

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()
