"""Zero-shot language-model benchmarks, scored at any TP x PP layout (Megatron-LM's old
``tasks/zeroshot_gpt``, whose numbers these reproduce):

- WikiText perplexity from raw text: the whole file is detokenized (``wikitext_detokenize``) and
  tokenized as one sequence, then scored in windows of seq_length + 1 tokens. With
  ``overlapping_eval = K`` the window moves K tokens at a time and, after the first window, only
  its last K targets count, so every token is predicted with up to seq_length - K tokens of
  context. Token-level perplexity is exp(mean loss per BPE token); word-level ("adjusted")
  perplexity rescales the total loss to the original whitespace word count,
  exp(loss * (tokens - 1) / (words - 1)).
- LAMBADA last-word accuracy: a passage counts only if EVERY token of its last word is the greedy
  choice. A passage longer than seq_length + 1 tokens keeps the context nearest its last word. Non-strict splits off the last BPE token as the target (Megatron's default);
  ``strict`` makes the target the tokens of " " + the last whitespace word. The stop-word filter
  (GPT-2 paper, section 3.3) excludes stop words from the model's first-token choice: the answer
  is never one, so the tokens that spell a stop word alone are masked before the argmax.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from megatron_lite.inference.forward import forward_through_stages, gathered_logits
from megatron_lite.inference.generation import token_losses
from megatron_lite.inference.loading import InferenceModel

# NLTK's English stop-word list (179 words), the usual choice for LAMBADA's filter.
STOP_WORDS = (
    "i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves "
    "he him his himself she she's her hers herself it it's its itself they them their theirs themselves "
    "what which who whom this that that'll these those am is are was were be been being have has had "
    "having do does did doing a an the and but if or because as until while of at by for with about "
    "against between into through during before after above below to from up down in out on off over "
    "under again further then once here there when where why how all any both each few more most other "
    "some such no nor not only own same so than too very s t can will just don don't should should've "
    "now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn "
    "hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn "
    "shouldn't wasn wasn't weren weren't won won't wouldn wouldn't").split()


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (Megatron-LM's ``wikitext_detokenizer``)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        text = text.replace(f" {p} ", f"{p} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" " + chr(176) + " ", chr(176))
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ").replace(" 's", "'s")
    return text


# ---- WikiText -----------------------------------------------------------------------------------

def lm_windows(ids: Sequence[int], seq_length: int, pad: int, overlapping_eval: int
               ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(tokens [seq_length + 1], mask [seq_length]) windows scoring every target of ``ids`` once."""
    stride = overlapping_eval
    total_targets = len(ids) - 1
    count = max(math.ceil(max(total_targets - stride, 0) / stride) + 1, 1)
    out = []
    for i in range(count):
        window = list(ids[i * stride: i * stride + seq_length + 1])
        mask = np.ones(seq_length + 1, dtype=np.float32)
        mask[len(window):] = 0
        window += [pad] * (seq_length + 1 - len(window))
        mask = mask[1:]
        if stride != seq_length and i != 0:
            mask[:-stride] = 0
        out.append((np.asarray(window, dtype=np.int64), mask))
    return out


@dataclass
class PerplexityResult:
    loss: float                  # mean loss per BPE target
    ppl: float
    adjusted_ppl: float          # per original whitespace word
    num_tokenized_tokens: int
    num_original_tokens: int
    windows: int


def _scored_loss(model: InferenceModel, windows, batch_size: int, progress=None) -> float:
    dev = model.pstate.device
    total = 0.0
    for start in range(0, len(windows), batch_size):
        if progress is not None:
            progress(start, len(windows))
        group = windows[start:start + batch_size]
        tokens = torch.from_numpy(np.stack([w for w, _ in group])).to(dev)
        mask = torch.from_numpy(np.stack([m for _, m in group])).to(dev)
        losses = token_losses(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        total += float((losses.double() * mask.double()).sum())
    return total


def wikitext_perplexity(model: InferenceModel, tokenizer, raw_text: str, overlapping_eval: int = 0,
                        batch_size: int = 8, progress=None) -> PerplexityResult:
    """Perplexity of ``raw_text`` (a WikiText file's contents); ``overlapping_eval`` 0: one window,
    which must hold the whole text (ValueError otherwise)."""
    seq = model.cfg.model.seq_length
    num_original = len(raw_text.strip().split(" "))
    ids = tokenizer.tokenize(wikitext_detokenize(raw_text))
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed to score one")
    if overlapping_eval <= 0:
        if len(ids) > seq + 1:
            raise ValueError(f"the text has {len(ids)} tokens but the model scores {seq + 1} at once: "
                             f"add --overlapping-eval K (1 <= K <= {seq}; Megatron-LM uses 32)")
        overlapping_eval = seq
    if overlapping_eval > seq:
        raise ValueError(f"--overlapping-eval {overlapping_eval} exceeds --seq-length {seq}")
    windows = lm_windows(ids, seq, tokenizer.eod, overlapping_eval)
    loss = _scored_loss(model, windows, batch_size, progress) / (len(ids) - 1)
    ratio = (len(ids) - 1) / max(num_original - 1, 1)
    return PerplexityResult(loss, math.exp(min(20.0, loss)), math.exp(min(20.0, loss * ratio)),
                            len(ids), num_original, len(windows))


# ---- LAMBADA ------------------------------------------------------------------------------------

def lambada_split(tokenizer, text: str, strict: bool) -> Tuple[List[int], List[int]]:
    """(context tokens, last-word tokens) of one passage."""
    if not strict:
        ids = tokenizer.tokenize(text)
        return ids[:-1], ids[-1:]
    last = text.split()[-1]
    start = text.rfind(last)
    return tokenizer.tokenize(text[:start].strip()), tokenizer.tokenize(" " + last)


def stop_word_token_ids(tokenizer) -> List[int]:
    """Tokens that spell a stop word by themselves, with its leading space (lower or capitalised)."""
    ids = set()
    for w in STOP_WORDS:
        # Only word-initial forms: a bare "s" or "re" is also the end of many words (cars, are).
        for form in (" " + w, " " + w.capitalize()):
            t = tokenizer.tokenize(form)
            if len(t) == 1:
                ids.add(t[0])
    return sorted(ids)


@dataclass
class LambadaResult:
    accuracy: float
    accuracy_stop_word_filter: float
    last_word_ppl: float         # exp(mean loss per last-word token)
    examples: int
    truncated: int               # passages whose context was cut on the left to fit seq_length + 1
    correct: List[bool]
    correct_filtered: List[bool]


def lambada_accuracy(model: InferenceModel, tokenizer, texts: Sequence[str], strict: bool = False,
                     batch_size: int = 8, progress=None) -> LambadaResult:
    """Last-word accuracy of every passage in ``texts``; ``progress(done, total)`` is called per batch."""
    ps, m = model.pstate, model.cfg.model
    seq, dev, vocab = m.seq_length, ps.device, m.vocab_size or m.padded_vocab_size
    pairs, truncated = [], 0
    for i, text in enumerate(texts):
        ctx, target = lambada_split(tokenizer, text, strict)
        if not ctx or not target:
            raise ValueError(f"example {i + 1} has no context or no last word")
        if len(target) >= seq:
            raise ValueError(f"example {i + 1}: its last word has {len(target)} tokens; the model scores {seq}")
        if len(ctx) + len(target) > seq + 1:  # keep the context nearest the last word
            ctx = ctx[len(ctx) + len(target) - seq - 1:]
            truncated += 1
        pairs.append((ctx, target))
    stop_ids = torch.tensor(stop_word_token_ids(tokenizer), dtype=torch.long, device=dev)
    correct, filtered, loss_sum, n_targets = [], [], 0.0, 0
    for start in range(0, len(pairs), batch_size):
        if progress is not None:
            progress(start, len(pairs))
        group = pairs[start:start + batch_size]
        width = max(len(c) + len(t) for c, t in group) - 1
        tokens = torch.full((len(group), width + 1), tokenizer.eod, dtype=torch.long, device=dev)
        for r, (c, t) in enumerate(group):
            tokens[r, :len(c) + len(t)] = torch.tensor(c + t, dtype=torch.long, device=dev)
        k = max(len(t) for _, t in group)
        # Position j predicts token j + 1: the last word's tokens are predicted at len(c)-1 ... .
        where = torch.tensor([[min(len(c) - 1 + j, width - 1) for j in range(k)] for c, _ in group],
                             dtype=torch.long, device=dev)
        targets = torch.tensor([t + [tokenizer.eod] * (k - len(t)) for _, t in group], dtype=torch.long, device=dev)

        def judge(logits):  # [b, n, V/tp] -> [3, b, k]: greedy hit, filtered hit, target log-prob
            picked = logits.gather(1, where.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
            full = gathered_logits(picked, ps, vocab)                     # [b, k, V]
            hit = full.argmax(-1) == targets
            masked = full.clone()
            masked[:, 0, stop_ids] = float("-inf")
            hit_filtered = masked.argmax(-1) == targets
            lp = torch.log_softmax(full, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            return torch.stack([hit.double(), hit_filtered.double(), lp.double()])

        positions = torch.arange(width, device=dev).unsqueeze(0).expand(len(group), -1)
        out = forward_through_stages(model, tokens[:, :width].contiguous(), positions, judge,
                                     (3, len(group), k), torch.float64)
        for r, (_, t) in enumerate(group):
            n = len(t)
            correct.append(bool(out[0, r, :n].all()))
            filtered.append(bool(out[1, r, :n].all()))
            loss_sum -= float(out[2, r, :n].sum())
            n_targets += n
    return LambadaResult(sum(correct) / len(correct), sum(filtered) / len(filtered),
                         math.exp(min(20.0, loss_sum / n_targets)), len(correct), truncated, correct, filtered)
