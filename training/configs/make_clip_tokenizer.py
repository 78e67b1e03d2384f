"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) used by SD1.5, offline.

Source: ``bpe_simple_vocab_16e6.txt.gz`` from the open_clip_torch wheel on PyPI (MIT licence), the same
merge list OpenAI's CLIP ships. CLIP's vocabulary is: the 256 byte-level characters, the same with
'</w>', the first 48,894 merges joined, then <|startoftext|> and <|endoftext|> (49,408 entries).
    pip download --no-deps open_clip_torch && python training/configs/make_clip_tokenizer.py <wheel>
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).parent / "sd15" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        lines = gzip.open(io.BytesIO(archive.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
