#!/usr/bin/python3
"""tts: speech synthesis for the Lingua `command` executor.

stdin:  {"text": "Necesito ir al hospital.", "lang": "es"}
stdout: {"audio": "<base64 WAV, 16 kHz mono 16-bit>", "lang": "es",
         "audio_ms": 1890, "model_ms": 60}
Model: espeak-ng (its voice for `lang`), resampled with sox (Debian
packages espeak-ng, sox).
"""

import os
import tempfile

from speech import BadInput, decode_wav, encode_wav, field, run, serve


def synthesise(payload):
    text, lang = field(payload, "text"), field(payload, "lang")
    if not text.strip():
        raise BadInput("text is empty: nothing to say")
    voices = run(["espeak-ng", "--voices"]).decode().splitlines()[1:]
    if lang not in (line.split()[1] for line in voices):
        raise BadInput(f"no voice for {lang!r}")
    with tempfile.TemporaryDirectory() as tmp:
        spoken, resampled = os.path.join(tmp, "spoken.wav"), os.path.join(tmp, "out.wav")
        run(["espeak-ng", "-v", lang, "-w", spoken, "--", text])
        run(["sox", "-R", spoken, "-r", "16000", "-c", "1", "-b", "16", resampled])
        with open(resampled, "rb") as file:
            audio = encode_wav(file.read())
    _, audio_ms = decode_wav(audio)
    return {"audio": audio, "lang": lang, "audio_ms": audio_ms}


if __name__ == "__main__":
    serve(synthesise)
