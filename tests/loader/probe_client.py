"""A bare stap-loader client, run as a test user: send raw bytes, report the frames.

usage: python probe_client.py SOCKET REQUEST_FILE (all|close|halfclose|wait=SECONDS)

``close`` closes the connection after the first output frame, ``halfclose``
shuts down the sending side there and keeps reading, ``wait=SECONDS`` gives up
reading after that long (reported as a frame of type ``_timeout``).  A reset
after the loader's last frame (it refused without reading everything) ends the
list like an EOF.  Prints the frames as JSON.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys

from stapinit import loader_wire as wire


def main() -> None:
    path, request_file, mode = sys.argv[1:4]
    frames: list[dict[str, object]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        if mode.startswith("wait="):
            sock.settimeout(float(mode.removeprefix("wait=")))
        with open(request_file, "rb") as req, contextlib.suppress(BrokenPipeError):
            sock.sendall(req.read())  # refused before it was all read: the answer still comes
        while True:
            try:
                frame = wire.read_frame(sock, 1 << 30)
            except TimeoutError:
                frames.append({"header": {"type": "_timeout"}, "payload": ""})
                break
            except ConnectionResetError:
                break
            if frame is None:
                break
            frames.append({"header": frame.header, "payload": frame.payload.decode("latin-1")})
            if frame.type == "output" and mode == "close":
                break
            if frame.type == "output" and mode == "halfclose":
                sock.shutdown(socket.SHUT_WR)
                mode = "all"
    print(json.dumps(frames))


if __name__ == "__main__":
    main()
