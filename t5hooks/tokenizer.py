"""A byte-level tokenizer (ByT5's scheme) so strings work with no download: id = byte + 3; pad 0, eos 1, unk 2."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPECIAL_TOKENS = {0: "<pad>", 1: "</s>", 2: "<unk>"}
OFFSET = 3


class ByteTokenizer:
    """UTF-8 bytes as tokens, with the call/decode interface of a Hugging Face tokenizer.

    `tokenizer(["ab", "c"], return_tensors="pt", padding=True)` -> {"input_ids", "attention_mask"}
    (EOS appended, right-padded with 0). Vocabulary size 259 (256 bytes + 3 specials); ByT5
    checkpoints use 384 ids, the rest unused.
    """

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    vocab_size = 256 + OFFSET
    padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: str | None = None,
        padding: bool = True,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> dict:
        """`truncation` with `max_length`: at most that many ids per row, EOS kept last (as Hugging Face's)."""
        batch = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in batch):
            raise TypeError("ByteTokenizer takes a string or a list of strings")
        rows = [self.encode(t, add_special_tokens) for t in batch]
        if truncation and max_length is not None:
            keep = max_length - 1 if add_special_tokens else max_length
            rows = [r if len(r) <= max_length else r[:keep] + r[len(r) - (max_length - keep) :] for r in rows]
        if return_tensors is None and not padding:
            return {"input_ids": rows if not isinstance(text, str) else rows[0]}
        width = max(len(r) for r in rows)
        ids = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
            }
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}; ByteTokenizer supports 'pt' or None")
        return {"input_ids": ids, "attention_mask": mask}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """One string per id: a special token's name, the character of an ASCII byte, else `<0xNN>`."""
        out = []
        for i in ids:
            i = int(i)
            if i in SPECIAL_TOKENS:
                out.append(SPECIAL_TOKENS[i])
            elif OFFSET <= i < OFFSET + 256:
                byte = i - OFFSET
                out.append(chr(byte) if byte < 128 else f"<0x{byte:02X}>")
            else:
                out.append(SPECIAL_TOKENS[self.unk_token_id])
        return out

    def str_tokens(self, ids: Sequence[int]) -> list[str]:
        """One label per token. A tokenizer that has this method labels its own tokens in `model.to_str_tokens`
        (a byte decoded alone may be half a character, so bytes are named, not decoded)."""
        return self.convert_ids_to_tokens(ids)

    def decode(
        self,
        ids: Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Bytes back to text (invalid UTF-8 replaced); special tokens kept unless skipped. Bytes have no spaces
        to clean up: `clean_up_tokenization_spaces` is accepted for the Hugging Face interface and changes nothing."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        text, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if OFFSET <= i < OFFSET + 256:
                pending.append(i - OFFSET)
                continue
            if pending:
                text.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if not skip_special_tokens:
                text.append(SPECIAL_TOKENS.get(i, SPECIAL_TOKENS[self.unk_token_id]))
        if pending:
            text.append(pending.decode("utf-8", errors="replace"))
        return "".join(text)

    def batch_decode(
        self,
        batch: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]
