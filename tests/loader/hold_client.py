"""Hold connections to stap-loader open, as a test user: the memory attack of issue 10 #7.

usage: python hold_client.py SOCKET COUNT REQUEST_FILE

Opens COUNT connections, sends the bytes of REQUEST_FILE on each (a header
announcing a large module, then a byte of it), prints ``sent``, and waits
until its standard input closes. Then it prints, as JSON, the type of the
first frame each connection got within 0.3 s (``_none`` if none).
"""

from __future__ import annotations

import json
import socket
import sys

from stapinit import loader_wire as wire


def main() -> None:
    path, count, request_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(request_file, "rb") as handle:
        data = handle.read()
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.sendall(data)
        held.append(sock)
    print("sent", flush=True)
    sys.stdin.read()
    answers = []
    for sock in held:
        sock.settimeout(0.3)
        try:
            frame = wire.read_frame(sock, 1 << 20)
            answers.append("_none" if frame is None else frame.type)
        except (TimeoutError, OSError, wire.WireError):
            answers.append("_none")
        sock.close()
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
