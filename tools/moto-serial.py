#!/usr/bin/env python3
"""Run moto's S3 server with one request at a time.

moto checks If-Match / If-None-Match and then writes in two steps without a
lock, so under load two conditional writers can both win, and concurrent
requests sometimes hit internal errors. AWS S3 makes these writes atomic.
Serializing requests here gives tests an S3 server whose conditional writes
are atomic, so races test our client and not moto.

usage: moto-serial.py HOST PORT
"""
import os
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ, start_response):
        # Produce the whole response under the lock: werkzeug may stream it.
        with lock:
            return list(app(environ, start_response))

    run_simple(host, port, serialized, threaded=True)


if __name__ == "__main__":
    main()
