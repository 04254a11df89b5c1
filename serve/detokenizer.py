"""Incremental detokenisation with stop strings, in one class.

    d = Detokenizer(tokenizer, stop=("\n\n",))
    text, stopped = d.push(token_id)     # the new text that is safe to show; a stop string hit?
    rest = d.flush()                     # at the end: release what was held back

Each push decodes all generated tokens and emits the new suffix, holding back
  * a trailing partial UTF-8 character (the tokenizer decodes it as U+FFFD), and
  * the longest tail that is a prefix of a stop string ("\n" while "\n\n" may still follow).
A stop string that completes ends the text just before it (the stop string is not shown).
Without a tokenizer (tokenizer=None) there is no text: every push returns ("", False).
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok, self.stop, self.ids, self.sent = tokenizer, stop, [], 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text, whether a stop string completed)."""
        if self.tok is None:
            return "", False
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if self.stop:
            lo = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                out, self.sent = text[self.sent:cut], max(self.sent, cut)
                return out, True
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0                                # longest tail that is a prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text[end - k:end] == s[:k]:
                    hold = k
                    break
        end -= hold
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out, False

    def flush(self) -> str:
        """The text held back so far (the request ended without a stop string)."""
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out
