#!/usr/bin/env python3
"""warren's code interpreter: the HTTP server @e2b/code-interpreter talks to on
port 49999 of a sandbox of the code-interpreter-v1 template.

The wire contract is E2B's (their template runs a FastAPI bridge to Jupyter):
GET /health; POST /execute streams one JSON object per line (stdout, stderr,
result, error, number_of_executions, keepalive, end_of_execution); contexts
are created, listed, restarted and deleted under /contexts. This server needs
nothing beyond the Python standard library: each context is a worker process
(this file run with --worker) that keeps the context's variables between
executions, shows the value of a cell's last expression as its main result
(with the rich forms objects offer through IPython's _repr_*_ methods, so a
pandas DataFrame comes with its HTML), captures output written by Python and
by child processes, runs `!command` lines in a shell and draws matplotlib
figures as PNG results.
"""

import argparse
import ast
import base64
import codecs
import datetime
import importlib.abc
import importlib.util
import io
import json
import linecache
import os
import selectors
import signal
import subprocess
import sys
import threading
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEEPALIVE_SECONDS = 5
LANGUAGES = ("python",)
DEFAULT_CWD = "/home/user"


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


# --------------------------------------------------------------------------
# The worker: one per context.
# --------------------------------------------------------------------------

# Rich forms, in the order of the client's Result fields, from IPython's
# display protocol (_repr_<form>_ methods).
REPR_FORMS = (
    ("html", "_repr_html_"),
    ("markdown", "_repr_markdown_"),
    ("svg", "_repr_svg_"),
    ("png", "_repr_png_"),
    ("jpeg", "_repr_jpeg_"),
    ("pdf", "_repr_pdf_"),
    ("latex", "_repr_latex_"),
    ("json", "_repr_json_"),
    ("javascript", "_repr_javascript_"),
)


class Worker:
    def __init__(self, proto):
        self.proto = proto
        self.lock = threading.Lock()
        self.count = 0
        self.ns = {"__name__": "__main__", "__builtins__": __builtins__}
        self.ns["display"] = self.display
        self.ns["get_ipython"] = lambda: None
        self.capture_fds()
        sys.stdout = Stream(self, "stdout")
        sys.stderr = Stream(self, "stderr")
        install_inline_backend(self)

    def send(self, msg):
        line = json.dumps(msg) + "\n"
        with self.lock:
            self.proto.write(line)
            self.proto.flush()

    # Child processes (os.system, subprocess, !commands) write to the file
    # descriptors 1 and 2: pipes read here and passed on as stdout/stderr.
    def capture_fds(self):
        self.fd_done = {}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            done = threading.Event()
            self.fd_done[fd] = done
            threading.Thread(target=self.pump, args=(r, name, done), daemon=True).start()

    MARK = b"\x00warren-end-of-cell\x00"

    def pump(self, r, name, done):
        pending = b""
        # A character may come in two reads.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                return
            pending += chunk
            while True:
                i = pending.find(self.MARK)
                if i < 0:
                    break
                text = decoder.decode(pending[:i], final=True)
                if text:
                    self.send({"type": name, "text": text, "timestamp": now()})
                pending = pending[i + len(self.MARK):]
                done.set()
            # Keep a possible start of the mark for the next read.
            keep = 0
            for n in range(min(len(self.MARK) - 1, len(pending)), 0, -1):
                if pending.endswith(self.MARK[:n]):
                    keep = n
                    break
            out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
            text = decoder.decode(out)
            if text:
                self.send({"type": name, "text": text, "timestamp": now()})

    def sync_fds(self):
        """Waits until what child processes wrote so far has been sent."""
        for fd, done in self.fd_done.items():
            done.clear()
            os.write(fd, self.MARK)
        for done in self.fd_done.values():
            done.wait(5)

    def result(self, value, main):
        msg = {"type": "result", "is_main_result": main, "text": safe_repr(value)}
        for form, method in REPR_FORMS:
            fn = getattr(value, method, None)
            if not callable(fn) or isinstance(value, type):
                continue
            try:
                data = fn()
            except Exception:
                continue
            if isinstance(data, tuple):  # (data, metadata)
                data = data[0]
            if data is None:
                continue
            if isinstance(data, bytes):
                data = base64.b64encode(data).decode()
            msg[form] = data
        self.send(msg)

    def display(self, *values):
        for v in values:
            self.result(v, False)

    def execute(self, code, env_vars):
        self.count += 1
        self.send({"type": "number_of_executions", "execution_count": self.count})
        saved = {k: os.environ.get(k) for k in env_vars}
        os.environ.update({k: str(v) for k, v in env_vars.items()})
        try:
            self.run(code)
        except KeyboardInterrupt:
            self.error(KeyboardInterrupt, KeyboardInterrupt(), None)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            sys.stdout.flush()
            sys.stderr.flush()
            self.sync_fds()
        self.send({"type": "done"})

    def run(self, code):
        filename = "<cell %d>" % self.count
        source = shell_lines(code)
        # Tracebacks quote the cell's lines, as a notebook's do.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            tree = ast.parse(source, filename, "exec")
        except SyntaxError as e:
            self.error(type(e), e, None)
            return
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        try:
            exec(compile(tree, filename, "exec"), self.ns)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.ns)
                if value is not None:
                    self.ns["_"] = value
                    self.result(value, True)
        except SystemExit as e:
            self.error(type(e), e, e.__traceback__)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            self.error(type(e), e, e.__traceback__)
        finally:
            flush_figures(self)

    def error(self, etype, value, tb):
        # Leave out this file's frames: the user's code is what failed.
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(etype, value, tb))
        self.send({"type": "error", "name": etype.__name__, "value": str(value), "traceback": text})


class Stream(io.TextIOBase):
    """sys.stdout and sys.stderr of a worker: whole lines become messages as
    they are written, the rest at flush (the end of an execution at the
    latest)."""

    def __init__(self, worker, name):
        self.worker, self.name = worker, name
        self.buf = ""
        self.lock = threading.Lock()

    def writable(self):
        return True

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        with self.lock:
            self.buf += s
            i = self.buf.rfind("\n")
            if i >= 0:
                text, self.buf = self.buf[: i + 1], self.buf[i + 1:]
                self.worker.send({"type": self.name, "text": text, "timestamp": now()})
        return len(s)

    def flush(self):
        with self.lock:
            text, self.buf = self.buf, ""
        if text:
            self.worker.send({"type": self.name, "text": text, "timestamp": now()})

    def fileno(self):
        return 1 if self.name == "stdout" else 2

    def isatty(self):
        return False


def safe_repr(value):
    try:
        return repr(value)
    except Exception as e:
        return "<%s object (repr failed: %s)>" % (type(value).__name__, e)


def shell_lines(code):
    """Turns `!command` lines (IPython's shell escape) into a call that runs
    the command in a shell, its output captured like any child's."""
    out = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("!") and not stripped.startswith("!="):
            indent = line[: len(line) - len(stripped)]
            out.append("%s__import__('subprocess').run(%r, shell=True)" % (indent, stripped[1:]))
        else:
            out.append(line)
    return "\n".join(out)


# matplotlib draws into PNG results: its backend is this module's, which
# shows figures as results (as Jupyter's inline backend does).
BACKEND = "warren_inline"


def install_inline_backend(worker):
    """Makes BACKEND importable: matplotlib imports it when pyplot starts,
    and only then does the module import matplotlib's Agg canvas."""

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name == BACKEND else None

        def create_module(self, spec):
            return None

        def exec_module(self, mod):
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            mod.FigureCanvas = FigureCanvasAgg
            mod.show = lambda *args, **kwargs: flush_figures(worker)

    sys.meta_path.append(Finder())
    os.environ.setdefault("MPLBACKEND", "module://" + BACKEND)


def flush_figures(worker):
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            worker.send({
                "type": "result", "is_main_result": False, "text": safe_repr(fig),
                "png": base64.b64encode(buf.getvalue()).decode(),
            })
        plt.close("all")
    except Exception as e:
        worker.send({"type": "stderr", "text": "warren: could not draw the figures: %s\n" % e, "timestamp": now()})


def worker_main():
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    worker = Worker(proto)
    while True:
        try:
            line = requests.readline()
        except KeyboardInterrupt:
            continue  # an interrupt between executions
        if not line:
            return
        try:
            req = json.loads(line)
        except ValueError:
            continue
        try:
            worker.execute(req.get("code", ""), req.get("env_vars") or {})
        except KeyboardInterrupt:
            worker.send({"type": "done"})


# --------------------------------------------------------------------------
# The server.
# --------------------------------------------------------------------------


class Context:
    def __init__(self, language, cwd):
        self.id = str(uuid.uuid4())
        self.language, self.cwd = language, cwd
        self.lock = threading.Lock()  # one execution at a time
        self.proc = None
        self.start()

    def start(self):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            cwd=self.cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self):
        with self.lock:
            self.stop()
            self.start()

    def interrupt(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def describe(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def execute(self, code, env_vars):
        """Yields the execution's messages; None when KEEPALIVE_SECONDS pass
        without one. The caller holds self.lock."""
        if self.proc.poll() is not None:
            self.start()  # the worker died (os._exit, a crash): a fresh one
        self.proc.stdin.write((json.dumps({"code": code, "env_vars": env_vars}) + "\n").encode())
        self.proc.stdin.flush()
        # Lines are split here, from the pipe's raw reads: a buffered reader
        # could hold the next line while select waits on the empty pipe.
        fd = self.proc.stdout.fileno()
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                if b"\n" not in buf:
                    if not sel.select(KEEPALIVE_SECONDS):
                        yield None
                        continue
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        yield {"type": "error", "name": "UnexpectedEndOfExecution",
                               "value": "the context's worker process ended during the execution", "traceback": ""}
                        self.proc.wait()
                        return
                    buf += chunk
                    continue
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("type") == "done":
                    return
                yield msg
        finally:
            sel.close()


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.contexts = {}
        self.defaults = {}  # language -> its default context

    def default(self, language):
        with self.lock:
            ctx = self.defaults.get(language)
            if ctx is None:
                ctx = Context(language, DEFAULT_CWD if os.path.isdir(DEFAULT_CWD) else os.getcwd())
                self.defaults[language] = ctx
            return ctx

    def create(self, language, cwd):
        ctx = Context(language, cwd)
        with self.lock:
            self.contexts[ctx.id] = ctx
        return ctx

    def get(self, cid):
        with self.lock:
            ctx = self.contexts.get(cid)
            if ctx is None:
                ctx = next((c for c in self.defaults.values() if c.id == cid), None)
            return ctx

    def remove(self, cid):
        with self.lock:
            return self.contexts.pop(cid, None)


STATE = State()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "warren-code-interpreter"

    def log_message(self, fmt, *args):
        pass

    def reply(self, status, body=None, content_type="application/json"):
        data = b""
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fail(self, status, message):
        self.reply(status, {"detail": message})

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("the body is not a JSON object")
        return data

    def context(self, cid):
        """The context cid, or None after answering 404."""
        ctx = STATE.get(cid)
        if ctx is None:
            self.fail(404, "Context %s not found" % cid)
        return ctx

    def supported(self, language):
        """Whether language has contexts here; answers 400 if not."""
        if language in LANGUAGES:
            return True
        self.fail(400, "language %r is not supported here (supported: %s)" % (language, ", ".join(LANGUAGES)))
        return False

    def path_parts(self):
        return [p for p in self.path.split("?", 1)[0].split("/") if p]

    def do_GET(self):
        parts = self.path_parts()
        if parts == ["health"]:
            self.reply(200, "OK")
        elif parts == ["contexts"]:
            with STATE.lock:
                listed = [c.describe() for c in STATE.contexts.values()]
            self.reply(200, listed)
        else:
            self.fail(404, "Not Found")

    def do_DELETE(self):
        parts = self.path_parts()
        if len(parts) == 2 and parts[0] == "contexts":
            ctx = STATE.remove(parts[1])
            if ctx is None:
                self.fail(404, "Context %s not found" % parts[1])
                return
            ctx.stop()
            self.reply(204)
        else:
            self.fail(404, "Not Found")

    def do_POST(self):
        parts = self.path_parts()
        try:
            req = self.body()
        except ValueError as e:
            self.fail(400, "invalid JSON body: %s" % e)
            return
        if parts == ["execute"]:
            self.execute(req)
        elif parts == ["contexts"]:
            language = req.get("language") or "python"
            if not self.supported(language):
                return
            cwd = req.get("cwd") or DEFAULT_CWD
            if not os.path.isdir(cwd):
                self.fail(400, "cwd %s is not a directory" % cwd)
                return
            self.reply(200, STATE.create(language, cwd).describe())
        elif len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart":
            ctx = self.context(parts[1])
            if ctx is None:
                return
            ctx.restart()
            self.reply(204)
        else:
            self.fail(404, "Not Found")

    def execute(self, req):
        code = req.get("code")
        if not isinstance(code, str):
            self.fail(400, "code must be a string")
            return
        cid, language = req.get("context_id"), req.get("language")
        if cid and language:
            self.fail(400, "Only one of context_id or language can be provided")
            return
        if cid:
            ctx = self.context(cid)
            if ctx is None:
                return
        else:
            language = language or "python"
            if not self.supported(language):
                return
            ctx = STATE.default(language)
        env_vars = req.get("env_vars") or {}
        if not isinstance(env_vars, dict):
            self.fail(400, "env_vars must be an object")
            return

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with ctx.lock:
            gone = False
            for msg in ctx.execute(code, env_vars):
                if gone:
                    continue  # drain to the end of the execution
                try:
                    self.wfile.write((json.dumps(msg if msg is not None else {"type": "keepalive"}) + "\n").encode())
                    self.wfile.flush()
                except OSError:
                    # The client left: stop the code, as a notebook's
                    # interrupt would.
                    gone = True
                    ctx.interrupt()
            if not gone:
                try:
                    self.wfile.write(b'{"type": "end_of_execution"}\n')
                    self.wfile.flush()
                except OSError:
                    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--listen", default="0.0.0.0:49999", help="address:port to serve on (default %(default)s)")
    args = ap.parse_args()
    if args.worker:
        worker_main()
        return
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    STATE.default("python")  # warm: the first execution need not wait for it
    print("code interpreter listening on %s" % args.listen, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
