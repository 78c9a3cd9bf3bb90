#!/usr/bin/python3
"""asr: English speech recognition for the Lingua `command` executor.

stdin:  {"audio": "<base64 WAV, 16 kHz mono 16-bit>", "lang": "en"}
stdout: {"text": "I need to go the hospital", "lang": "en",
         "audio_ms": 2460, "model_ms": 1210}
Model: pocketsphinx with its US English model (Debian packages
pocketsphinx, pocketsphinx-en-us). Silence gives an empty text.
"""

import tempfile

from speech import BadInput, decode_wav, field, run, serve


def recognise(payload):
    lang = field(payload, "lang")
    if lang != "en":
        raise BadInput(f"no speech recognition model for {lang!r}; this one knows 'en'")
    wav, audio_ms = decode_wav(field(payload, "audio"))
    with tempfile.NamedTemporaryFile(suffix=".wav") as file:
        file.write(wav)
        file.flush()
        text = run(["pocketsphinx_continuous", "-infile", file.name, "-logfn", "/dev/null"])
    # One line per stretch of speech it found, in lower case: write "I" and
    # the first letter as English is written, for the translator.
    words = ["I" if word == "i" else word for word in text.decode().split()]
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return {"text": text, "lang": lang, "audio_ms": audio_ms}


if __name__ == "__main__":
    serve(recognise)
