#!/usr/bin/python3
"""translate_service: the `translate` model of translate.py served over
HTTP, for the Lingua `http` executor (one such service per GPU, in spirit).

    translate_service.py [PORT]      # default 8001; 0 picks a free port

POST /translate with the payload of translate.py as the body: 200 and its
JSON output, or 400 {"error": "..."} for bad input, 500 when the model
fails (the agent fails the job with that body). It prints
`listening on http://127.0.0.1:PORT` once it accepts requests.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from speech import BadInput
from translate import translate


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        started = time.monotonic()
        if self.path != "/translate":
            return self.answer(404, {"error": f"no route {self.path}; POST /translate"})
        try:
            length = int(self.headers.get("Content-Length", 0))
            payload = json.loads(self.rfile.read(length))
            if not isinstance(payload, dict):
                raise BadInput("the payload must be a JSON object")
            output = translate(payload)
        except (BadInput, ValueError) as err:
            return self.answer(400, {"error": f"bad input: {err}"})
        except (RuntimeError, OSError) as err:
            return self.answer(500, {"error": f"model failed: {err}"})
        output["model_ms"] = round((time.monotonic() - started) * 1000)
        self.answer(200, output)

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        """Quiet: one line per request would drown the agent's logs."""


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8001
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
