"""The built-in default of ``moefuse train``: a config, an instruction dataset and a tokenizer shipped in the package.

Everything here runs without network. The dataset and tokenizer files under ``moefuse/data`` are made by this
module (``python -m moefuse.train.builtin`` writes them again, byte for byte): short instruction/answer pairs of
a few regular tasks, so a tiny model trained for a few dozen steps shows its loss falling, and a byte-level BPE
tokenizer trained on them whose vocabulary fits the tiny Qwen3-MoE (512 tokens) with a ChatML chat template.
"""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path

DATA_DIR = Path(str(files("moefuse") / "data"))
DEFAULT_CONFIG = DATA_DIR / "train-default.yaml"
DATASET = DATA_DIR / "train-instructions.jsonl"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
BUILTIN_DATASET = "builtin:instructions"  # the name the config uses for DATASET

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen models use it; {% generation %} marks the assistant's tokens so that TRL's
# assistant_only_loss can train on the answers alone.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra",
}  # fmt: skip
_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "light": "dark", "happy": "sad",
    "open": "closed", "full": "empty", "high": "low", "old": "new", "hard": "soft", "long": "short",
    "strong": "weak", "rich": "poor", "wet": "dry", "up": "down", "first": "last", "near": "far",
}  # fmt: skip
_WORDS = (
    "river", "planet", "garden", "window", "silver", "market", "orange", "pencil", "rocket", "bridge",
    "castle", "forest", "dragon", "yellow", "summer", "winter", "candle", "mirror", "island", "button",
    "cloud", "stone", "apple", "tiger", "music", "paper", "light", "ocean", "green", "table",
)  # fmt: skip
_PLURALS = {
    "box": "boxes", "city": "cities", "child": "children", "mouse": "mice", "leaf": "leaves", "bus": "buses",
    "story": "stories", "foot": "feet", "knife": "knives", "tooth": "teeth", "cat": "cats", "dish": "dishes",
    "baby": "babies", "man": "men", "wolf": "wolves", "goose": "geese", "day": "days", "glass": "glasses",
}  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def _tasks(rng: random.Random) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for _ in range(50):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for _ in range(30):
        a, b = rng.randint(20, 90), rng.randint(1, 19)
        pairs.append((f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."))
    for country, capital in _CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for word, opposite in _OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
        pairs.append((f"What is the opposite of {opposite}?", f"The opposite of {opposite} is {word}."))
    for word in _WORDS:
        pairs.append((f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."))
        pairs.append((f"How many letters are in '{word}'?", f"'{word}' has {len(word)} letters."))
        pairs.append((f"Write '{word}' in capital letters.", f"{word.upper()}"))
    for word, plural in _PLURALS.items():
        pairs.append((f"What is the plural of '{word}'?", f"The plural of '{word}' is '{plural}'."))
    for i, day in enumerate(_DAYS):
        pairs.append((f"Which day comes after {day}?", f"{_DAYS[(i + 1) % 7]} comes after {day}."))
        pairs.append((f"Which day comes before {day}?", f"{_DAYS[i - 1]} comes before {day}."))
    for _ in range(40):
        numbers = rng.sample(range(1, 100), rng.randint(3, 5))
        listed = ", ".join(map(str, numbers))
        pairs.append((f"Sort these numbers: {listed}.", ", ".join(map(str, sorted(numbers))) + "."))
    for _ in range(30):
        n = rng.randint(1, 200)
        pairs.append((f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    return pairs


def build_dataset(path: Path = DATASET) -> Path:
    """Write the built-in instruction dataset: one ``{"messages": [...]}`` conversation a line (TRL's format)."""
    rng = random.Random(0)
    pairs = _tasks(rng)
    rng.shuffle(pairs)
    with open(path, "w") as out:
        for i, (question, answer) in enumerate(pairs):
            messages = [{"role": "system", "content": _SYSTEM}] if i % 4 == 0 else []
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def build_tokenizer(dataset: Path = DATASET, out_dir: Path = TOKENIZER_DIR, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on ``dataset`` (any text still encodes: bytes are in the vocabulary)
    and save it as a Transformers tokenizer with the ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in dataset.read_text().splitlines():
        messages = json.loads(line)["messages"]
        texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    wrapped.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(f"wrote {build_dataset()} and {build_tokenizer()}")
