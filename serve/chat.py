"""Chat templates: how /v1/chat/completions turns `messages` into one prompt for a base model.

    t = ChatTemplate.default()                 # or ChatTemplate.from_file("my_template.jinja")
    t.render([{"role": "user", "content": "Hi"}])   # "User: Hi\nAssistant:"

A template is Jinja2 (the format Hugging Face tokenizers and vLLM use), rendered in a sandbox
with `messages` (dicts with `role`, `content` as text, `name` — the default template does not
show names), `add_generation_prompt` (always true here) and `raise_exception(message)` (a
template's way to refuse a conversation: the client gets a 400 with the message). The
default, for models trained on plain text:

    <system content>\n\n            (each system message, then a blank line)
    User: <content>\n               (each user message)
    Assistant: <content>\n          (each assistant message)
    Assistant:                      (the cue to answer)

There is no implicit stop string: pass `stop: ["\nUser:"]` to end the answer where a base
model would start the next turn. `jobs/serve.py --chat_template [NAME=]FILE` replaces the
default for one model (or all); GET /tokenizer_info shows the template in use.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT = ("{% for m in messages %}"
           "{% if m.role == 'system' %}{{ m.content }}\n\n"
           "{% elif m.role == 'user' %}User: {{ m.content }}\n"
           "{% else %}Assistant: {{ m.content }}\n{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


class ChatTemplate:
    def __init__(self, source: str, origin: str = "the default chat template"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
        try:
            self._t = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"{origin}: not a valid Jinja2 template ({e})") from None
        self.source, self.origin = source, origin

    @classmethod
    def default(cls) -> "ChatTemplate":
        return cls(DEFAULT)

    @classmethod
    def from_file(cls, path: str | Path) -> "ChatTemplate":
        f = Path(path).expanduser()
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat_template {path}: cannot read it ({e})") from None
        t = cls(text, f"--chat_template {path}")
        t.render([{"role": "user", "content": "hi", "name": None}])        # fails now, not later
        return t

    def render(self, messages: list[dict]) -> str:
        """The prompt; ValueError when the template refuses or fails (the client gets 400)."""
        try:
            return self._t.render(messages=messages, add_generation_prompt=True,
                                  raise_exception=_raise)
        except Exception as e:                                  # noqa: BLE001 - template code
            raise ValueError(f"{self.origin} failed to render ({type(e).__name__}: {e})") from None


def _raise(message: str):
    from jinja2 import TemplateError
    raise TemplateError(message)
