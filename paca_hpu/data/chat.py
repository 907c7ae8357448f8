"""Chat template rendering: a conversation split into prompt and trained pieces (:func:`chat_segments`), and the
template used when a tokenizer has none (:data:`FALLBACK_CHAT_TEMPLATE`)."""

from __future__ import annotations

from typing import Sequence

#: Chat format used when the tokenizer has no chat template::
#:
#:     [system content + "\n\n"]  "User: " + user content + "\n"  "Assistant: " + response + eos_token + "\n"
#:
#: with "Assistant: " as the generation prompt. The response and the eos token are trained; everything else
#: is masked. If the tokenizer adds a BOS token by default, it is put (masked) in front of the sequence.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + (eos_token or '') + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def _render(tokenizer, messages, add_generation_prompt: bool, chat_template: str | None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def _reply_boundaries(reply: str, content: str, eot: str | None) -> tuple[int, int]:
    """(start, end) of the trained part of a rendered assistant reply: from the content to the end of the first
    end-of-turn marker after it (or, without a marker, to the end of the reply minus trailing whitespace)."""
    start = reply.find(content) if content else -1
    if start < 0 and content.strip():
        start = reply.find(content.strip())
        content = content.strip()
    if start < 0:
        start, after = 0, 0
    else:
        after = start + len(content)
    if eot:
        k = reply.find(eot, after)
        if k >= 0:
            return start, k + len(eot)
    return start, max(len(reply.rstrip()), after)


def chat_segments(tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, trained)`` pieces, in order.

    Rendering is incremental: for each assistant turn ``i``, the prompt is
    ``render(messages[:i], add_generation_prompt=True)`` and the reply is what ``render(messages[:i+1])`` adds
    after it. The reply's content plus its end-of-turn marker (``tokenizer.eos_token``, ``<|im_end|>`` for
    SmolLM2) are trained; the template around it (the ``"\\n"`` after ``<|im_end|>``, role headers, system
    prompt) is not. Messages after the last assistant turn are dropped (they carry no loss).

    Raises:
        ValueError: no assistant message, or the chat template does not render conversations prefix-consistently.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ValueError("conversation has no assistant message to train on")
    eot = getattr(tokenizer, "eos_token", None)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in range(last + 1):
        if messages[i]["role"] != "assistant":
            continue
        prompt = _render(tokenizer, list(messages[:i]), True, chat_template)
        full = _render(tokenizer, list(messages[: i + 1]), False, chat_template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "The chat template does not render a conversation as a prefix of its continuation, so prompt and "
                "response tokens cannot be separated. Use a different chat template (tokenizer.chat_template)."
            )
        reply = full[len(prompt) :]
        start, end = _reply_boundaries(reply, str(messages[i]["content"]), eot)
        segments += [(prompt[len(done) :], False), (reply[:start], False), (reply[start:end], True)]
        if end < len(reply):
            segments.append((reply[end:], False))
        done = full
    return [(text, trained) for text, trained in segments if text]
