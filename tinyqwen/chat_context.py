"""A chat that outgrows its context window: how much room a reply needs, and which history goes first.

A model sees at most `context` tokens (its max_position_embeddings, or less by choice). A conversation grows with
every exchange, so sooner or later the next prompt would leave no room for a reply. There are two honest answers:
refuse the message (the model's memory of the conversation stays whole, but the conversation ends), or forget its
beginning. `tinyqwen chat` forgets: before each reply it drops the *oldest exchanges* — a user message and the
replies to it — until the prompt leaves `reply_room` tokens free, and says how many it dropped. System messages
always stay, since they set up the whole conversation. A single message too long even with no history left is the
caller's to refuse.

Everything here works on the message list (role/content dicts, as the chat template takes them); the tokens come
from a `render` function the caller passes, so this module knows nothing of tokenizers or models.

    >>> history = [{"role": "system", "content": "Be brief."},
    ...            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    ...            {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]
    >>> render = lambda messages: [0] * sum(1 + len(m["content"]) for m in messages)  # 1 token a character
    >>> kept, ids, dropped = fit_to_context(history, {"role": "user", "content": "Another?"}, render, 45, 8)
    >>> [m["content"] for m in kept], len(ids), dropped
    (['Be brief.', 'Name a prime.', '7'], 35, 1)
"""

from __future__ import annotations

from collections.abc import Callable


def reply_room(max_new_tokens: int, context: int) -> int:
    """Tokens a new prompt must leave free for the reply: --max-new-tokens, but at most a quarter of the context
    (a 2,048-token reply budget must not empty a 4,096-token conversation).

    >>> reply_room(2048, 40960), reply_room(2048, 4096)
    (2048, 1024)
    """
    return max(0, min(max_new_tokens, context // 4))


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The history without its oldest exchange (the first user message and everything up to the next user
    message); system messages stay. None when there is no exchange left to drop.

    >>> m = [{"role": "system"}, {"role": "user"}, {"role": "assistant"}, {"role": "user"}, {"role": "assistant"}]
    >>> [x["role"] for x in drop_oldest_exchange(m)]
    ['system', 'user', 'assistant']
    """
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        return None
    end = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), len(messages))
    return messages[:first] + messages[end:]


def fit_to_context(
    messages: list[dict],
    new: dict,
    render: Callable[[list[dict]], list[int]],
    context: int,
    room: int,
) -> tuple[list[dict], list[int], int]:
    """(history kept, prompt ids of history + `new`, exchanges dropped): the oldest exchanges of `messages` are
    dropped one at a time until the rendered prompt leaves `room` tokens of `context` free, or nothing is left to
    drop (the prompt may then still be too long: the caller decides what to do with it).

    `render` turns a message list into the prompt's ids (in the chat: the chat template with the generation prompt).
    `messages` is not changed.
    """
    ids = render([*messages, new])
    dropped = 0
    while len(ids) + room > context and (shorter := drop_oldest_exchange(messages)) is not None:
        messages, dropped = shorter, dropped + 1
        ids = render([*messages, new])
    return messages, ids, dropped
