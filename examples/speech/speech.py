"""Helpers shared by the speech executor programs of this directory.

A `command` executor program reads one JSON payload on stdin and writes
one JSON object on stdout; on bad input or a model failure it writes one
line to stderr and exits non-zero, and the agent fails the job with that
line in the error (executor_failed).
"""

import base64
import binascii
import io
import json
import subprocess
import sys
import time
import wave

STARTED = time.monotonic()
RATE = 16000  # Hz: every WAV in and out is 16 kHz, mono, 16-bit


class BadInput(Exception):
    """The payload cannot be served; the message says why."""


def read_payload():
    """The job's payload: a JSON object on stdin."""
    try:
        payload = json.load(sys.stdin)
    except json.JSONDecodeError as err:
        raise BadInput(f"the payload is not JSON: {err}") from err
    if not isinstance(payload, dict):
        raise BadInput("the payload must be a JSON object")
    return payload


def field(payload, name):
    """A string field of the payload, required."""
    value = payload.get(name)
    if not isinstance(value, str):
        raise BadInput(f'the payload needs "{name}" (a string)')
    return value


def decode_wav(data_b64):
    """The WAV bytes of base64 `data_b64` and their length in ms, checked
    to be 16 kHz mono 16-bit."""
    if not data_b64:
        raise BadInput("audio is empty")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(f"audio is not base64: {err}") from err
    try:
        with wave.open(io.BytesIO(data)) as wav:
            shape = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
            frames = wav.getnframes()
    except (wave.Error, EOFError) as err:
        raise BadInput(f"audio is not a WAV file: {err}") from err
    if shape != (RATE, 1, 2):
        raise BadInput(
            f"audio must be 16 kHz mono 16-bit WAV, got {shape[0]} Hz, "
            f"{shape[1]} channel(s), {8 * shape[2]}-bit"
        )
    if frames == 0:
        raise BadInput("audio holds no samples")
    return data, frames * 1000 // RATE


def encode_wav(data):
    """Base64 text of WAV bytes."""
    return base64.b64encode(data).decode("ascii")


def run(argv, stdin=b""):
    """Runs a model program; its stdout, or a failure naming it."""
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        last = message[-1] if message else f"exit status {done.returncode}"
        raise RuntimeError(f"{argv[0]} failed: {last}")
    return done.stdout


def serve(handler):
    """The main of a command program: payload in, `handler(payload)` out,
    with the program's own time as `model_ms`."""
    try:
        output = handler(read_payload())
    except BadInput as err:
        sys.exit(f"bad input: {err}")
    except (RuntimeError, OSError) as err:
        sys.exit(f"model failed: {err}")
    output["model_ms"] = round((time.monotonic() - STARTED) * 1000)
    json.dump(output, sys.stdout)
