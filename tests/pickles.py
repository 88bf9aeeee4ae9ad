"""Hostile pickles, written by hand as an attacker would."""

import zipfile


def hostile_checkpoint(path, pickle_bytes: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
    return path


def payload(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle that calls module.name(arg): what a hostile .ckpt does."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()
