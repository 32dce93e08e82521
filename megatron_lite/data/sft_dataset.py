"""Instruction fine-tuning data: prompt templates, records -> (tokens, loss mask), packed samples.

On disk (``tools/preprocess_sft.py``), each split is two Megatron-format shards with one sequence
per example and equal lengths: ``PREFIX_text_document`` (token ids, the response ending in the
end-of-document token) and ``PREFIX_loss_mask_document`` (uint8, 1 on the response tokens and that
EOD). Only the response is trained on: the mask of a label is the mask of the token it predicts.

``SFTDataset`` serves samples of seq_length + 1 tokens: examples packed back to back while they fit
(each ends in EOD, so ``--reset-attention-mask --reset-position-ids`` keep them from attending to
each other and restart their positions), or one per sample with ``pack=False``; the rest is EOD
padding with zero loss. torch-free (the data tools import it).
"""
from __future__ import annotations

import json
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.errors import DatasetError, InputError

RESPONSE_MARKER = "{response}"
# Alpaca's template; a paragraph holding {input} is dropped when the record's input is empty.
DEFAULT_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                    "### Response:\n{response}")
TEXT_SUFFIX, MASK_SUFFIX = "_text_document", "_loss_mask_document"


class PromptTemplate:
    """A template with ``{instruction}``, optional ``{input}`` and the ``{response}`` marker: the text
    before the marker is the prompt (no loss), the response and anything after it are trained."""

    def __init__(self, text: str, source: str = "the default template"):
        if text.count(RESPONSE_MARKER) != 1:
            found = "no" if RESPONSE_MARKER not in text else "more than one"
            raise InputError(f"{source}: the template has {found} {RESPONSE_MARKER} marker; put exactly one "
                             "where the response starts (the text before it is the prompt, not trained on)")
        if "{instruction}" not in text:
            raise InputError(f"{source}: the template has no {{instruction}} placeholder")
        self.prompt, self.suffix = text.split(RESPONSE_MARKER)

    @classmethod
    def from_file(cls, path: Optional[str]) -> "PromptTemplate":
        if path is None:
            return cls(DEFAULT_TEMPLATE)
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), f"--prompt-template {path}")

    def render_prompt(self, instruction: str, input_text: str = "") -> str:
        prompt = self.prompt
        if not input_text.strip():
            prompt = "\n\n".join(p for p in prompt.split("\n\n") if "{input}" not in p)
        return prompt.replace("{instruction}", instruction).replace("{input}", input_text)


# ---- reading records -------------------------------------------------------------------------
def read_records(path: str) -> Iterator[Tuple[int, object]]:
    """(line, record) from a JSON array file or a JSONL file; bad JSON is an InputError naming the line."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_array_records(path, text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _json_array_records(path: str, text: str) -> Iterator[Tuple[int, object]]:
    """The elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            raise InputError(f"{path}:{text.count(chr(10), 0, n) + 1}: the JSON array is not closed")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield line, record


def _text_field(where: str, record: dict, key: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise InputError(f"{where}: record has no {key!r} field (an instruction record needs "
                             "'instruction' and 'output'; a chat record needs 'messages')")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} is a {type(value).__name__}, not a string")
    return value


def record_segments(record, template: PromptTemplate, where: str) -> Tuple[List[Tuple[str, bool]], str, str]:
    """(segments [(text, trained)], prompt of the last turn, its reference response) of one record.

    Alpaca: the template's prompt, then the output. Chat (``messages``): system text first, then per
    user/assistant turn the template with the user's content as the instruction; every assistant
    reply is trained on."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _chat_segments(record["messages"], template, where)
    instruction = _text_field(where, record, "instruction")
    input_text = _text_field(where, record, "input", required=False)
    output = _text_field(where, record, "output")
    if not instruction.strip():
        raise InputError(f"{where}: the 'instruction' field is empty")
    prompt = template.render_prompt(instruction, input_text)
    return [(prompt, False), (output + template.suffix, True)], prompt, output


def _chat_segments(messages, template: PromptTemplate, where: str):
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    segments: List[Tuple[str, bool]] = []
    context, pending_user, last_prompt, last_reply = "", None, "", None
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise InputError(f"{where}: message {k} needs a string 'role' and a string 'content'")
        role, content = m["role"], m["content"]
        if role == "system":
            segments.append((content + "\n\n", False))
            context += content + "\n\n"
        elif role == "user":
            pending_user = content
        elif role == "assistant":
            if pending_user is None:
                raise InputError(f"{where}: message {k} is an assistant reply with no user message before it")
            prompt = template.render_prompt(pending_user)
            sep = "\n\n" if last_reply is not None else ""
            segments.append((sep + prompt, False))
            segments.append((content + template.suffix, True))
            last_prompt = context + prompt
            context += sep + prompt + content + template.suffix
            last_reply, pending_user = content, None
        else:
            raise InputError(f"{where}: message {k} has role {role!r}; use system, user or assistant")
    if last_reply is None:
        raise InputError(f"{where}: the conversation has no assistant message to train on")
    return segments, last_prompt, last_reply


def tokenize_segments(segments: Sequence[Tuple[str, bool]], tokenizer) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids (ending in EOD) and the per-token loss mask (1 on trained segments and the EOD)."""
    ids: List[int] = []
    mask: List[int] = []
    for text, trained in segments:
        piece = tokenizer.tokenize(text) if text else []
        ids.extend(piece)
        mask.extend([int(trained)] * len(piece))
    ids.append(tokenizer.eod)
    mask.append(1)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


# ---- samples ---------------------------------------------------------------------------------
class SFTDataset:
    """Samples {"text": seq+1 ids, "loss_mask": seq values} over a split's shards, for ``num_samples``
    samples (epochs repeat; with ``shuffle`` each epoch has its own order from ``seed``)."""

    def __init__(self, prefix: str, seq_length: int, eod: int, *, pack: bool = True,
                 num_samples: Optional[int] = None, shuffle: bool = False, seed: int = 1234):
        self.texts = IndexedDataset(prefix + TEXT_SUFFIX)
        self.masks = IndexedDataset(prefix + MASK_SUFFIX)
        if not np.array_equal(self.texts.sequence_lengths, self.masks.sequence_lengths):
            raise DatasetError(f"{prefix}{MASK_SUFFIX}: its sequence lengths differ from {prefix}{TEXT_SUFFIX}'s; "
                               "write both with tools/preprocess_sft.py")
        if len(self.texts) == 0:
            raise DatasetError(f"{prefix}{TEXT_SUFFIX}: the split has no examples")
        self.seq_length, self.eod, self.pack = seq_length, eod, pack
        lengths = np.minimum(self.texts.sequence_lengths.astype(np.int64), seq_length + 1)
        self.samples: List[List[int]] = []
        epoch = 0
        while epoch == 0 or (num_samples is not None and len(self.samples) < num_samples):
            order = (np.random.RandomState(seed + epoch).permutation(len(lengths)) if shuffle
                     else np.arange(len(lengths)))
            self.samples.extend(pack_examples(order, lengths, seq_length + 1) if pack else [[int(i)] for i in order])
            epoch += 1
        if num_samples is not None:
            self.samples = self.samples[:num_samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        n = self.seq_length + 1
        text = np.full(n, self.eod, dtype=np.int64)
        mask = np.zeros(n, dtype=np.float32)
        pos = 0
        for ex in self.samples[idx]:
            tokens, tmask = self.texts[ex], self.masks[ex]
            length = min(len(tokens), n - pos)
            text[pos:pos + length] = tokens[:length]
            mask[pos:pos + length] = tmask[:length]
            mask[pos] = 0.0  # an example's first token is never predicted (across a boundary or at all)
            pos += length
        return {"text": text, "loss_mask": mask[1:]}


def pack_examples(order: Sequence[int], lengths: np.ndarray, capacity: int) -> List[List[int]]:
    """Greedy packing in ``order``: examples join the current sample while they fit in ``capacity``."""
    samples, current, used = [], [], 0
    for i in order:
        length = int(lengths[i])
        if current and used + length > capacity:
            samples.append(current)
            current, used = [], 0
        current.append(int(i))
        used += length
    if current:
        samples.append(current)
    return samples
