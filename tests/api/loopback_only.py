"""Run uvicorn's command line in a process that can reach the loopback address only.

A Python audit hook sees every socket connection, datagram and name lookup the process makes; one that would
leave the machine (any address but 127.0.0.0/8 or ::1, any name but localhost) is refused and recorded in the
file named by ``DAMA_TEST_EGRESS_LOG``, so a test can assert that nothing tried. Used by the fuzzing test: no
fuzzed request may make the service talk to the outside world.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

EGRESS_LOG = os.environ["DAMA_TEST_EGRESS_LOG"]
CONNECTING = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})


def _is_loopback(host: object) -> bool:
    if host in (None, "", "localhost", b"localhost"):
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost: looking it up already reaches a resolver


def _refuse_egress(event: str, args: tuple[Any, ...]) -> None:
    if event in CONNECTING:
        address = args[1] if len(args) > 1 else None
        host = address[0] if isinstance(address, tuple) and address else None  # None: a Unix socket
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if not _is_loopback(host):
        with open(EGRESS_LOG, "a") as log:
            log.write(f"{event} {host!r}\n")
        raise PermissionError(f"this test process may reach the loopback address only, not {host!r}")


if __name__ == "__main__":
    sys.addaudithook(_refuse_egress)
    from uvicorn.main import main

    sys.argv[0] = "uvicorn"
    main()
