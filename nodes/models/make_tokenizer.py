"""Regenerate the shipped SD1 CLIP tokenizer files (vocab.json + merges.txt) from CLIP's BPE file.

The BPE file ``bpe_simple_vocab_16e6.txt.gz`` ships inside the open-clip-torch wheel (MIT). Fetch the wheel
without its dependencies, which would pull in torchvision and a CUDA torch, and never install it:

    pip download --no-deps -d /tmp/wheel open-clip-torch==3.3.0
    python -m nodes.models.make_tokenizer /tmp/wheel/open_clip_torch-3.3.0-py3-none-any.whl \
        nodes/models/configs/sd15/tokenizer

The output is 49,408 tokens in the order of CLIP's own ``SimpleTokenizer``: the 256 byte characters, the same
with ``</w>``, 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>``. ``tests/test_models_loading.py``
checks the sha256 of both files (environment.md §2).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import zipfile

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Source: CLIP's simple_tokenizer.py: merges = merges[1:49152-256-2+1] (skip the header, keep 48,894 merges).
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte → printable-character table (the same as GPT-2's).

    Example:
        >>> table = bytes_to_unicode()
        >>> len(table), table[ord("a")], table[ord(" ")]
        (256, 'a', 'Ġ')
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, characters, extra = printable[:], printable[:], 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, characters)))


def convert(bpe_gz: bytes, out_dir: str) -> int:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir`` from the gzipped BPE file's bytes.

    Args:
        bpe_gz: the content of ``bpe_simple_vocab_16e6.txt.gz``.
        out_dir: the folder to write; created if missing.
    Returns:
        The vocabulary size (49,408).
    """
    merges = gzip.decompress(bpe_gz).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as file:
        json.dump({token: index for index, token in enumerate(vocab)}, file, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as file:
        file.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def bpe_from_wheel(wheel_path: str) -> bytes:
    """The BPE file's bytes from an open-clip-torch (or clip-anytorch) wheel, read without installing it.

    Raises:
        FileNotFoundError: the wheel holds no ``bpe_simple_vocab_16e6.txt.gz``.
    """
    with zipfile.ZipFile(wheel_path) as wheel:
        names = [name for name in wheel.namelist() if name.endswith(BPE_NAME)]
        if not names:
            raise FileNotFoundError(f"{wheel_path!r} holds no {BPE_NAME}; use the open-clip-torch 3.3.0 wheel")
        return wheel.read(names[0])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m nodes.models.make_tokenizer WHEEL OUT_DIR")
    print(convert(bpe_from_wheel(sys.argv[1]), sys.argv[2]))
