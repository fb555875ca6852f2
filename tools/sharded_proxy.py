"""nginx in front of shop-sharded replica groups, on loopback (tests/test_sharded.py, bench/sharded.py).

It runs docker/nginx-sharded.conf itself, the routing config the compose profile deploys: the file
is linked into a private directory beside the two files that differ per deployment (the groups'
replica addresses and the public listen port), so what is tested is what is deployed."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.server import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docker" / "nginx-sharded.conf"
SHARD_HEADER = "X-Rice-Shard"  # which group's listener a response came through (set by the config)


def nginx_binary() -> str | None:
    """nginx from PATH, else Debian's /usr/sbin (outside a normal user's PATH); None when absent."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def upstreams_conf(groups: Sequence[Sequence[str]]) -> str:
    """The per-deployment upstreams file: group i's replicas ("host:port") as upstream rice_group_<i>."""
    blocks = []
    for i, replicas in enumerate(groups):
        servers = "".join(f"    server {r};\n" for r in replicas)
        blocks.append(f"upstream rice_group_{i} {{\n{servers}    keepalive 16;\n}}\n")
    return "".join(blocks)


def config_groups(config: Path = CONFIG) -> list[int]:
    """The shard numbers of rice_shards' servers in configuration order (nginx hashes to server i)."""
    text = config.read_text()
    block = re.search(r"upstream rice_shards \{(.*?)\}", text, re.S)
    assert block, "no rice_shards upstream"
    return [int(m) for m in re.findall(r"server unix:rice-shard-(\d+)\.sock max_fails=0;", block.group(1))]


@dataclass
class RunningProxy:
    url: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    def log(self) -> str:
        """The tail of nginx's error log and access log (for assertion messages)."""
        files = [self.workdir / n for n in ("nginx.err", "nginx.out")]
        return "".join(f.read_text(errors="replace")[-3000:] for f in files if f.exists())


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def sharded_nginx(groups: Sequence[Sequence[str]], workdir: Path, ready_timeout_s: float = 60) -> Iterator[RunningProxy]:
    """nginx on a free loopback port routing by shop over `groups` (group i = shard i; each a list of
    "host:port" replicas), with its prefix, sockets, pid and logs in `workdir`; stopped after."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed: `make proxy` installs Debian's (apt-get)")
    workdir.mkdir(parents=True, exist_ok=True)
    conf_dir = workdir / "conf"
    (conf_dir / "nginx-sharded").mkdir(parents=True, exist_ok=True)
    main = conf_dir / "nginx.conf"
    if not main.is_symlink():
        main.symlink_to(CONFIG)  # includes resolve next to this link, the file itself is the repository's
    port = free_port()
    (conf_dir / "nginx-sharded" / "upstreams.conf").write_text(upstreams_conf(groups))
    (conf_dir / "nginx-sharded" / "listen.conf").write_text(f"listen 127.0.0.1:{port};\n")
    directives = "daemon off;"
    if os.geteuid() == 0:  # workers would switch to an unprivileged user that cannot enter a private temp dir
        directives += f" user {pwd.getpwuid(0).pw_name};"
    args = [binary, "-p", f"{workdir}/", "-c", str(main), "-e", "stderr", "-g", directives]
    with (workdir / "nginx.out").open("ab") as out, (workdir / "nginx.err").open("ab") as err:
        proc = subprocess.Popen(args, cwd=workdir, stdout=out, stderr=err)  # cwd: the shard sockets go here
    proxy = RunningProxy(f"http://127.0.0.1:{port}", proc, workdir)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {proxy.log()}")
            time.sleep(0.05)
        yield proxy
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
