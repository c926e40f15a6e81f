"""What lies beside an exported GGUF file: an Ollama Modelfile and a README saying how to run it.

Texts only (gguf_export writes them). The Modelfile carries what the model was trained with, so that Ollama prompts
it the same way: the chat template (ChatML, the one translated to Ollama's Go template syntax) or, for a run trained
on plain prompts, the recipe's prompt template around the user's text; the end-of-turn tokens as stops; the
recipe's system prompt.
"""

from __future__ import annotations

import re

from qlora_lite.errors import UserError
from qlora_lite.recipe import PromptRecipe, literal_braces, placeholders

# Ollama's Go template for ChatML. Ollama hands the template the system prompt both as .System and as system
# messages in .Messages (template.go, collate), so the loop skips those.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""


def modelfile(tokenizer, gguf_name: str, prompt: PromptRecipe | None = None) -> str:
    """An Ollama Modelfile for gguf_name, lying beside it, for a model trained with `prompt` (None: as a chat
    model). A chat-trained model gets its chat template translated where it is ChatML (SmolLM2, Qwen), else none
    (with a comment); a model trained on plain prompts gets the recipe's template with the user's text in it."""
    if re.search(r"[\s/\\\"]", gguf_name):
        raise UserError(f"GGUF file name {gguf_name!r}: give a bare file name without spaces or quotes")
    system = prompt.system if prompt is not None else None
    if system is not None and '"""' in system:
        raise UserError('prompt.system contains """, which ends a Modelfile value: remove it')
    chat = prompt is None or prompt.chat_template
    template = getattr(tokenizer, "chat_template", None)
    vocab = tokenizer.get_vocab()
    chatml = isinstance(template, str) and all(t in template and t in vocab for t in ("<|im_start|>", "<|im_end|>"))
    lines = [f"FROM ./{gguf_name}", ""]
    if chat and chatml:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
    elif chat:
        lines += ["# No TEMPLATE: only ChatML chat templates are translated, and this tokenizer's is "
                  f"{'not ChatML' if template else 'missing'}.",
                  "# Ollama then matches the chat template stored in the GGUF file to one it knows, or sends the "
                  "prompt as it is.", ""]
    elif (plain := plain_template(prompt.template)) is not None:
        lines += ["# Trained on plain prompts (prompt.chat_template = false): your text goes where the recipe's "
                  "template had its column.", f'TEMPLATE """{plain}"""', ""]
    else:
        lines += ["# No TEMPLATE: the recipe's prompt.template fills several columns and Ollama passes one text; "
                  "write the whole prompt yourself, as the README shows.", ""]
    stops = ["<|im_end|>"] if chat and chatml else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def plain_template(template: str) -> str | None:
    """prompt.template as an Ollama (Go) template with {{ .Prompt }} in place of its one column; None when it has
    several columns. Its literal braces are unescaped ({{ -> {), and a literal "{{" is quoted for Go."""
    columns = set(placeholders(template))
    if len(columns) != 1:
        return None
    parts = re.split(r"(?<!\{)\{" + re.escape(columns.pop()) + r"\}(?!\})", template)
    literal = [literal_braces(p).replace("{{", '{{"{{"}}') for p in parts]
    return "{{ .Prompt }}".join(literal)


def readme(gguf_name: str, model_name: str, prompt: PromptRecipe | None = None, checked: str | None = None, *,
           conversations: bool = False) -> str:
    """How to run the file with llama.cpp and Ollama, how it was prompted in training (`conversations`: on whole
    chats, data.format = "messages"), what the export check showed, and how to make a smaller Q4_K_M from it."""
    ollama_name, small = model_name.lower(), f"{model_name}-Q4_K_M.gguf"
    requantize = " --allow-requantize" if gguf_name.endswith("q8_0.gguf") else ""  # llama-quantize refuses it else
    lines = [f"# {model_name} (GGUF)", "", f"`{gguf_name}` runs in llama.cpp and Ollama.", ""]
    if checked:
        lines += [checked, ""]
    if prompt is not None and conversations:
        lines += ["## Prompt it as it was trained", "", "Training showed it whole conversations in its chat template: "
                  "chat with it (Ollama's TEMPLATE below is that template).", ""]
        if prompt.system:
            lines += [f"with the system prompt, where a conversation had none: {prompt.system}", ""]
    elif prompt is not None:
        how = ("as the user's message of a chat (the chat template wraps it)" if prompt.chat_template
               else "as plain text, followed directly by its answer")
        lines += ["## Prompt it as it was trained", "", f"Training showed it prompts of this form, {how}:", "",
                  *(f"    {line}" for line in literal_braces(prompt.template).splitlines()), ""]
        if prompt.system:
            lines += [f"with the system prompt: {prompt.system}", ""]
    lines += [
        "## llama.cpp", "",
        f"    llama-cli -m {gguf_name}                    # chat in the terminal",
        f"    llama-server -m {gguf_name} --port 8080     # OpenAI-compatible server on http://localhost:8080", "",
        "## Ollama", "",
        "From this folder (the Modelfile here points at the file beside it):", "",
        f"    ollama create {ollama_name} -f Modelfile",
        f"    ollama run {ollama_name}", "",
        "## Smaller: Q4_K_M", "",
        "About a third of the F16 size, usually a small loss. It needs llama.cpp's compiled `llama-quantize` (from a "
        "llama.cpp release or build); quantize an f16 or bf16 export (from a q8_0 one it needs --allow-requantize "
        "and loses more):", "",
        f"    llama-quantize{requantize} {gguf_name} {small} Q4_K_M", "",
        f"then point the Modelfile's FROM at ./{small}.", "",
    ]
    return "\n".join(lines)
