"""oxserve's Python worker: serves one model over TorchServe's worker protocol.

    python3 oxserve_worker.py --sock-type unix --sock-name /tmp/.oxs.sock.9000 [--metrics-config metrics.yaml] [--async]

Run with the unpacked model folder as working directory. Binds and listens on the socket, prints
`[PID]<pid>` and `Torch worker started.`, accepts one connection from the server and serves it
until the server disconnects. Standard library only: no torch needed. With `--async`
(`asyncCommunication: true`), requests are served concurrently and answered in any order.

Under torchrun (model parallelism, `parallelType: tp|pp|pptp`), as TorchServe's worker does: rank
`LOCAL_RANK` listens on the socket name's port number plus its rank (`.oxs.sock.9000` -> `.9001`
for rank 1), every rank answers the load message, and only rank 0 answers inference messages
(the others run the same batch for their collective operations and stay silent).
"""

import argparse
import functools
import logging
import os
import platform
import socket
import sys
import traceback

# torchrun's rank of this process on its node (0 without torchrun).
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0") or 0)


def rank_socket_name(name):
    """TorchServe's rule: the number after the last dot plus LOCAL_RANK."""
    if LOCAL_RANK == 0:
        return name
    base, _, port = name.rpartition(".")
    return "%s.%d" % (base, int(port) + LOCAL_RANK)


def main():
    parser = argparse.ArgumentParser(description="oxserve Python worker")
    parser.add_argument("--sock-type", default="unix", choices=["unix", "tcp"])
    parser.add_argument("--sock-name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--metrics-config")
    parser.add_argument("--async", dest="async_mode", action="store_true")
    args = parser.parse_args()

    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    sys.stderr.reconfigure(line_buffering=True, errors="backslashreplace")
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)

    from oxserve_runtime import protocol, service

    if args.sock_type == "unix":
        if not args.sock_name:
            parser.error("--sock-name is required with --sock-type unix")
        args.sock_name = rank_socket_name(args.sock_name)
        try:
            os.remove(args.sock_name)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.sock_name)
    else:
        if args.port is None:
            parser.error("--port is required with --sock-type tcp")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port + LOCAL_RANK))
    sock.listen(1)
    print("[PID]%d" % os.getpid(), flush=True)
    print("Torch worker started.", flush=True)
    print("Python runtime: %s" % platform.python_version(), flush=True)

    conn, _ = sock.accept()
    sock.close()
    if args.sock_type == "unix":
        try:
            os.remove(args.sock_name)
        except OSError:
            pass
    if args.async_mode:
        return serve_async(conn, protocol, service, args.metrics_config)
    return serve(conn, protocol, service, args.metrics_config)


def load(conn, protocol, service, msg, metrics_config):
    """Loads the model and answers the load message; returns the service, or None if it failed."""
    try:
        svc = service.Service(msg, metrics_config)
    except BaseException as e:  # pylint: disable=broad-except
        traceback.print_exc()
        conn.sendall(protocol.encode_load_reply(
            500, "cannot load model %s: %s: %s" % (msg["model_name"], type(e).__name__, e)))
        return None
    svc.context.cl_socket = conn
    conn.sendall(protocol.encode_load_reply(200, "loaded model %s" % msg["model_name"]))
    return svc


def serve_async(conn, protocol, service, metrics_config):
    """Async mode (`asyncCommunication: true`, TorchServe's `--async`): after the load, every
    inference message is started on the event loop as it arrives, many run at once, and each
    reply frame (streamed parts included) is sent when it is ready, matched by request id.

    The event loop itself reads the socket (`add_reader`): a request that arrives alone wakes
    one thread, the loop's, which decodes it and starts its handler; a reader thread would add a
    second wake-up, a hand-over of the GIL and the loop's self-pipe to every request. Everything
    that has arrived is decoded in one callback and started in the next loop iteration.
    A handler that blocks the loop holds back new requests either way: they are started on the
    loop. Replies go through service.CoalescingWriter: the frames written in one loop iteration
    leave together, in writes of up to 16 frames. A cancel message (oxserve's, when a client has
    gone away) cancels the handler's task of that request: see protocol's module docstring."""
    cmd, msg = protocol.read_message(conn)
    if cmd != protocol.LOAD:
        print("the first message must load the model", file=sys.stderr)
        return 1
    svc = load(conn, protocol, service, msg, metrics_config)
    if svc is None:
        return 1
    loop = svc.loop()
    writer = service.CoalescingWriter(conn, loop)
    svc.context._oxserve_writer = writer  # pylint: disable=protected-access

    # The task serving each request id, while its handler runs: what a cancel message stops.
    running = {}

    async def run(batch):
        frame = await svc.predict_async(batch, loop)
        if LOCAL_RANK != 0:
            return
        writer.write(frame)

    def start(batch):
        ids = [request["request_id"] for request in batch]
        task = loop.create_task(run(batch))
        for rid in ids:
            running[rid] = task
        task.add_done_callback(functools.partial(finished, ids))

    def finished(ids, task):
        for rid in ids:
            if running.get(rid) is task:
                del running[rid]
        # Cancelled (its clients went away; a task cancelled before it started never ran at
        # all): the handler saw the CancelledError, and an engine freed the sequence there. The
        # frontend still gets a final answer for every request, so that it stops counting them
        # as in flight.
        if task.cancelled() and LOCAL_RANK == 0:
            writer.write(protocol.create_predict_response(
                None, dict(enumerate(ids)), "cancelled: the client closed the request", 499))

    def cancel(rid):
        # A batch is cancelled once every request of it is: one client going away must not
        # stop the others' answers. (TorchServe's vLLM recipe sends one request per batch.)
        task = running.pop(rid, None)
        if task is not None and task not in running.values():
            task.cancel()

    inbox = protocol.MessageBuffer()

    def stop():
        loop.remove_reader(conn.fileno())
        loop.stop()

    def readable():
        # The socket stays blocking (a handler may write to context.cl_socket with sendall);
        # this read alone does not wait.
        try:
            data = conn.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            traceback.print_exc()
            stop()
            return
        if not data:
            stop()
            return
        try:
            for cmd, payload in inbox.feed(data):
                if cmd == protocol.CANCEL:
                    cancel(payload)
                else:
                    start(payload)
        except ValueError as e:
            print("async mode: %s" % e, file=sys.stderr)
            stop()

    loop.add_reader(conn.fileno(), readable)
    loop.run_forever()
    return 0


def serve(conn, protocol, service, metrics_config):
    svc = None
    source = protocol.BufferedConn(conn)
    while True:
        try:
            cmd, msg = protocol.read_message(source)
        except protocol.Disconnected:
            return 0
        if cmd == protocol.LOAD:
            svc = load(conn, protocol, service, msg, metrics_config)
            if svc is None:
                return 1
        elif svc is None:
            print("inference request before the model was loaded", file=sys.stderr)
            return 1
        else:
            frame = svc.predict(msg)
            if LOCAL_RANK != 0:
                continue
            with service._send_lock(svc.context):  # pylint: disable=protected-access
                conn.sendall(frame)


if __name__ == "__main__":
    sys.exit(main())
