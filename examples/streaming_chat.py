"""Streaming chat: text appears as each speculative round is accepted (TextIteratorStreamer).

python examples/streaming_chat.py [--target DIR --draft DIR] [--interactive]
"""

from threading import Thread

from _models import load_pair, parse_args
from transformers import TextIteratorStreamer

import saguaro

args = parse_args(
    __doc__.splitlines()[0], **{"--interactive": dict(action="store_true", help="read messages from stdin")}
)
tokenizer, target, draft, prompts = load_pair(args)
saguaro.enable(target, draft_model=draft, method="speculative")


def reply(message: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(message, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    worker = Thread(target=target.generate, kwargs=dict(**inputs, max_new_tokens=64, streamer=streamer))
    worker.start()
    pieces = []
    for piece in streamer:  # arrives round by round, several tokens at a time
        print(piece, end="", flush=True)
        pieces.append(piece)
    worker.join()
    print()
    return "".join(pieces)


messages = iter(lambda: input("you> "), "") if args.interactive else prompts[:2]
for message in messages:
    print(f"user: {message}\nassistant: ", end="")
    reply(message)
saguaro.disable(target)
