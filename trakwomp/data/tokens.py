"""Token ids of texts, made on first use and shared by selections, and their padded batches."""

from __future__ import annotations

import functools

import numpy as np
import torch



class Tokens:
    """The token ids of a list of texts, made on first use (and shared by its selections), cut
    to `max_length`, with every text's full token count; for prompt/completion texts (`prompts`
    given: text j is prompts[j] followed by its completion) and conversations (`conversations`:
    role/content messages, rendered by the tokenizer's chat template) also each text's mask of
    predicted tokens (the completion's; the assistant turns')."""

    def __init__(self, texts: list[str], tokenizer, max_length: int | None, prompts: list[str] | None = None,
                 conversations: list[list[dict]] | None = None):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.prompts, self.conversations = prompts, conversations

    @functools.cached_property
    def fewest(self) -> np.ndarray:
        return self.tokenizer.fewest_tokens(self.texts)

    @functools.cached_property
    def _encoded(self) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
        if self.conversations is not None:
            return self.tokenizer.encode_conversations(self.conversations, self.max_length)
        if self.prompts is None:
            return (*self.tokenizer.encode(self.texts, self.max_length), None)
        completions = [text[len(prompt):] for text, prompt in zip(self.texts, self.prompts, strict=True)]
        ids, lengths, starts = self.tokenizer.encode_pairs(self.prompts, completions, self.max_length)
        return ids, lengths, [np.arange(len(i)) >= start for i, start in zip(ids, starts, strict=True)]

    @property
    def ids(self) -> list[np.ndarray]:
        return self._encoded[0]

    @property
    def lengths(self) -> np.ndarray:
        return self._encoded[1]

    @property
    def masks(self) -> list[np.ndarray] | None:
        """Per text, True at the tokens whose prediction counts (after the cut); None for plain texts."""
        return self._encoded[2]


class GivenTokens(Tokens):
    """Token ids given as they are (an answer's generated ids), with their masks of predicted
    tokens: nothing is made from the texts."""

    def __init__(self, ids: list[np.ndarray], masks: list[np.ndarray]):
        self._given = (ids, np.array([len(i) for i in ids], dtype=np.int64), masks)

    @property
    def _encoded(self):
        return self._given

    @property
    def fewest(self) -> np.ndarray:
        return self._given[1]


def padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with 0 to the longest, and the mask of real tokens."""
    longest = max(len(ids) for ids in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = True
    return ids, mask
