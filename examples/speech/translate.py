#!/usr/bin/python3
"""translate: text translation for the Lingua `command` executor.

stdin:  {"text": "I need to go to the hospital.", "src_lang": "en", "tgt_lang": "es"}
stdout: {"text": "Necesito ir al hospital.", "src_lang": "en", "tgt_lang": "es",
         "model_ms": 450}
Model: apertium with its English <-> Spanish data (Debian packages
apertium, apertium-en-es). Empty text gives an empty translation.
"""

import os

from speech import BadInput, field, run, serve

# The fleet's language codes (ISO 639-1) as apertium names them.
APERTIUM = {"en": "eng", "es": "spa"}
MODES = "/usr/share/apertium/modes"


def installed_pairs():
    names = sorted(f[: -len(".mode")] for f in os.listdir(MODES) if f.endswith(".mode"))
    return ", ".join(names) or "none"


def translate(payload):
    text = field(payload, "text")
    src, tgt = field(payload, "src_lang"), field(payload, "tgt_lang")
    mode = f"{APERTIUM.get(src, src)}-{APERTIUM.get(tgt, tgt)}"
    if not os.path.exists(os.path.join(MODES, f"{mode}.mode")):
        raise BadInput(f"no translation model for {src} -> {tgt} (installed: {installed_pairs()})")
    translated = run(["apertium", "-u", mode], text.encode()) if text.strip() else b""
    return {"text": translated.decode().strip(), "src_lang": src, "tgt_lang": tgt}


if __name__ == "__main__":
    serve(translate)
