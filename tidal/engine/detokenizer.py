"""Incremental detokenization and stop strings for one sequence.

Owns: `IncrementalDetokenizer`: token ids in, streamable text deltas out. Decoding a whole
sequence every step is O(n^2) and decoding each token alone is wrong (a UTF-8 character
can span tokens; SentencePiece-style tokenizers drop or add a leading space depending on
context). So it decodes a small window of recent tokens twice, with and without the
newest ones, and emits the difference (the prefix/read offset technique). It also finds
stop strings in the output text and holds back any tail that could still grow into one.
Must not: decide other finish conditions (eos, stop_token_ids, max_tokens: the engine
checks those) or touch the tokenizer's state.
"""
from __future__ import annotations

from tidal.sampling import SamplingParams

# How many prompt tokens seed the first window: enough context for the tokenizer to decide
# whether the first generated token starts with a space.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Contract: `output_text` always equals the concatenation of every string returned by
    `append` and `flush` so far. Call `flush()` once when the sequence finishes for any
    reason other than a stop string, to release text held back for a possible stop string
    or for an unfinished UTF-8 character."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.stop = list(params.stop or [])
        self.token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # token_ids[prefix_offset:read_offset] is the context already turned into text;
        # token_ids[read_offset:] are tokens whose text has not been released yet.
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self._text = ""  # decoded output text (cut at the stop string once one matches)
        self._released = 0  # characters of _text already handed out
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched (the engine reports it)
        self._finished = False

    @property
    def output_text(self) -> str:
        return self._text[:self._released]

    def _decode(self, ids: list[int]) -> str:
        # No clean_up_tokenization_spaces: it rewrites " ." across window edges, so the
        # pieces would no longer add up to the decode of the whole sequence.
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        # A trailing U+FFFD usually means a multi-byte character is still incomplete: wait
        # for the next token rather than stream a replacement character.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text):]

    def append(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token -> (text safe to stream now, stopped by a stop string)."""
        if self.stopped:
            return "", True
        self.token_ids.append(token_id)
        self._add_text(self._decode_new(final=False))
        return self._release(), self.stopped

    def flush(self) -> str:
        """Release whatever is held back; the sequence is finished."""
        if self.stopped:
            return ""
        self._add_text(self._decode_new(final=True))
        self._finished = True  # nothing can still grow into a stop string
        return self._release()

    def _add_text(self, delta: str) -> None:
        if not delta:
            return
        old_len = len(self._text)
        self._text += delta
        # Only a match that ends inside the new text can be new; among those, the one that
        # ends first wins, which is what streaming one character at a time would give, so
        # the result does not depend on where token boundaries fall.
        best = None
        for s in self.stop:
            i = self._text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
                best = (i, s)
        if best is not None:
            i, s = best
            self._text = self._text[:i + len(s)] if self.params.include_stop_str_in_output else self._text[:i]
            self.stopped, self.stop_reason = True, s

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if self.stopped or self._finished or self.params.include_stop_str_in_output:
            # Once the stop string would be kept anyway, streaming its first characters early is harmless.
            return 0
        text, hold = self._text, 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return hold

    def _release(self) -> str:
        end = max(self._released, len(self._text) - self._held_back())
        delta = self._text[self._released:end]
        self._released = end
        return delta
