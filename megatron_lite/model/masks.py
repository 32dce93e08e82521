"""Attention mask, loss mask and position ids for a left-to-right LM batch (Megatron-LM's
``get_ltor_masks_and_position_ids``).

Documents are packed back to back, separated by the end-of-document token (EOD), which belongs
to the document it ends. Options, as Megatron's flags:
  --reset-attention-mask: tokens after an EOD cannot attend to anything up to and including it;
  --reset-position-ids:   positions restart at 0 after each EOD;
  --eod-mask-loss:        no loss on positions whose token is the EOD.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod_token: int, reset_position_ids: bool,
                                    reset_attention_mask: bool, eod_mask_loss: bool
                                    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """tokens [b, s] -> (attention_mask, loss_mask, position_ids).

    attention_mask: None when plain causal (the model applies causality itself), else bool
    [b, 1, s, s] with True = masked (causal + document boundaries). loss_mask: float [b, s].
    position_ids: long [b, s].
    """
    b, s = tokens.shape
    device = tokens.device
    loss_mask = torch.ones((b, s), dtype=torch.float, device=device)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(s, dtype=torch.long, device=device).unsqueeze(0).expand(b, s).clone()
    allowed = None
    if reset_attention_mask:
        allowed = torch.tril(torch.ones((b, s, s), dtype=torch.bool, device=device))
    if reset_position_ids or reset_attention_mask:
        for row in range(b):
            eod_positions = (tokens[row] == eod_token).nonzero(as_tuple=True)[0].tolist()
            prev = 0
            for i in eod_positions:
                if reset_attention_mask:
                    allowed[row, i + 1:, :i + 1] = False
                if reset_position_ids:
                    position_ids[row, i + 1:] -= i + 1 - prev
                    prev = i + 1
    attention_mask = None if allowed is None else (~allowed).unsqueeze(1)
    return attention_mask, loss_mask, position_ids
