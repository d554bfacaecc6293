"""Token ids in, text out, as tokens arrive: what is sent never has to be taken back."""

from __future__ import annotations


class TextStream:
    """Decodes a growing answer and gives the text that is final so far: an incomplete UTF-8
    character (decoded as U+FFFD) waits for its next token, and so does an end that could be the
    start of a stop string. At the first stop string the text ends, without it, as OpenAI's does."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.token_ids: list[int] = []
        self.stopped = False  # a stop string was found; nothing more will be sent
        self._sent = 0  # characters of the decoded text already given out

    def push(self, token_ids: list[int]) -> str:
        """Add new token ids; return the text that became final."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._give(text[:cut])
        end = len(text)
        while end > self._sent and text[end - 1] == "\ufffd":
            end -= 1
        return self._give(text[: end - self._held_back(text[:end])])

    def finish(self) -> str:
        """The rest, once the answer is complete (a trailing U+FFFD is then what the model wrote)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._give(text)

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` could begin a stop string."""
        return max(
            (k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])),
            default=0,
        )

    def _give(self, text: str) -> str:
        new = text[self._sent :]
        self._sent = max(self._sent, len(text))
        return new
