"""A small seeded game world for the quick start: lore to pretrain on, role-play chats to fine-tune
on, and questions to evaluate with.

    python -m data_pipeline.synthetic --out runs/demo/data [--seed 0] [--characters 16]

    make_world ─► World (characters, places, quests)
        ├─► lore_documents, heldout_documents   pretraining text that states every fact
        ├─► sft_conversations                   chats in which the assistant plays a character
        ├─► eval_items                          "facts": card fields asked in unseen wordings
        │                                       "lore":  the ally or rival SFT never asked about
        └─► rl_prompts                          questions for online RL, in SFT's wordings and on
                                                SFT's fields only, so both eval splits stay unseen
    write_corpus writes them all as JSON Lines (and the world as world.json).

The data is built to be learnable by the tiny model on a CPU in minutes: invented names made of a
few syllables (a ~2000-piece tokenizer covers each in a token or two), short regular sentences,
every fact stated outright, and answers that copy the fact verbatim, so that "correct" can mean
"the expected string appears in the answer".

Split "facts" measures what fine-tuning adds: the lore tells every card fact as prose ("Halka is a
goblin."), and uses the questions' key words (race, trade, home town, signature item) only in
general travellers' guides, so a pretrained-only model knows the facts and the words but was
never taught that "your race" asks for one.

Split "lore" measures whether knowledge from pretraining reaches the chat: SFT asks each
character about exactly one of ally / rival (alternating by index), never the other, and the
character card (system prompt) states neither, so the held-out one is known only from the lore.

Everything is a pure function of the seed: the same seed gives byte-identical files. Documents,
and SFT chats in their user and assistant text (the system message aside), are unique, so the
pipeline's exact deduplication keeps them all; its near-duplicate removal (Jaccard 0.8) drops
about 1% of the documents and under 1% of the chats at the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

FIELDS = ("race", "home", "occupation", "item", "ally", "rival")
"""The facts a question can ask about."""
CARD_FIELDS = ("race", "home", "occupation", "item")
"""The facts the character card (system prompt) states; ally and rival are left to the lore."""
SOCIAL_FIELDS = ("ally", "rival")

# --- pools: small closed vocabularies --------------------------------------------------------

NAME_SYLLABLES = (
    "bra", "dor", "el", "fin", "gar", "hal", "ka", "lor", "mir", "nes", "ost", "pel",
    "quin", "rha", "sil", "tam", "ul", "vor", "wyn", "zar", "ko", "tha", "bel", "dun",
)  # fmt: skip
TOWN_PREFIXES = ("Ember", "Frost", "Stone", "Thorn", "Mist", "Ash", "Raven", "Gold", "Iron", "Salt", "Oak", "Storm")
TOWN_SUFFIXES = ("fall", "holm", "wick", "ford", "mere", "gate")
PLACE_DESCRIPTIONS = (
    "a town of forges in the red hills",
    "a fishing port on a grey sea",
    "a quiet village among old pines",
    "a walled city of white stone",
    "a market town where two rivers meet",
    "a mining town under the mountain",
    "a frozen harbour in the far north",
    "a town of windmills on the plains",
    "a river town of bridges and mills",
    "a hill fort above the marshes",
    "a desert town around a deep well",
    "a lake town built on wooden stilts",
)
RACES = ("dwarf", "elf", "human", "orc", "gnome", "halfling", "goblin", "giant")
OCCUPATIONS = (
    "blacksmith", "healer", "hunter", "merchant", "scholar", "sailor",
    "baker", "miner", "alchemist", "bard", "guard", "weaver",
)  # fmt: skip
ITEM_ADJECTIVES = ("Ember", "Silver", "Iron", "Moon", "Storm", "Copper", "Glass", "Bone", "Golden", "Shadow")
ITEM_NOUNS = (
    "Lantern", "Compass", "Key", "Harp", "Spear", "Kettle", "Hammer", "Mirror", "Cloak", "Bell", "Drum", "Flute",
    "Shield", "Anchor", "Lute", "Ring", "Dagger", "Horn", "Staff", "Map", "Quill", "Chalice", "Scales", "Crown",
)  # fmt: skip
CATCHPHRASES = (
    "Steel remembers.", "The tide always turns.", "Fortune favours the bold.", "The road goes ever on.",
    "Fire fears no one.", "Silence is golden.", "Bread before battle.", "Every coin has two faces.",
    "Stars guide the patient.", "Never trust a calm sea.", "Roots run deep.", "A sharp blade, a clear mind.",
    "Laughter heals all.", "Keep your boots dry.", "The mountain does not bow.", "Every song ends.",
    "Old debts never die.", "Luck loves a fool.", "Words cut deeper than knives.", "Trust the wind.",
    "Small feet, big steps.", "Ink outlasts iron.", "Shadows keep secrets.", "Dawn comes for all.",
)  # fmt: skip
MAX_CHARACTERS = min(len(NAME_SYLLABLES), len(ITEM_NOUNS), len(CATCHPHRASES))
QUEST_ADJECTIVES = ("Lost", "Sunken", "Broken", "Silent", "Burning", "Stolen", "Hollow", "Ninth")
QUEST_NOUNS = ("Crown", "Bell", "Oath", "Well", "Bridge", "Star", "King", "Door")
TIMES = (
    "In the year of the long winter",
    "When the rivers rose",
    "One autumn, long ago",
    "In the spring of the red comet",
    "On the night of the great storm",
    "When the old king died",
)


@dataclass(frozen=True)
class Voice:
    """A speaking style: the card describes it, and it opens and ends the character's answers."""

    description: str
    openers: tuple[str, ...]
    endings: tuple[str, ...]
    """How a fact sentence ends: a full stop, or a short tag in the voice."""


VOICES = {
    "gruff": Voice(
        "gruff and blunt, in few words", ("Hmph.", "Bah.", "Aye."), (".", ", of course.", ", and that is that.")
    ),
    "formal": Voice(
        "formal and polite, like a herald",
        ("Greetings, traveller.", "Certainly.", "A fair question."),
        (".", ", if you please."),
    ),
    "cheerful": Voice(
        "cheerful and warm, full of joy", ("Oh, hello there!", "Happy to help!", "What fun!"), ("!", ", hooray!")
    ),
    "sly": Voice(
        "sly and teasing, full of hints", ("Heh.", "Well, well.", "Curious, are we?"), (".", ", or so they say.")
    ),
}

# --- question and answer templates -----------------------------------------------------------

# Questions are frames filled with a field's key words. Every train frame is used with every
# field, so the frame says nothing about the field and the model must key on the word: with a
# frame used for one field only ("Tell me your race."), a tiny model answered "Tell me your
# occupation." with its race. Eval frames are never used in training, so split "facts" tests a
# new wording of a known key word rather than recall of a seen question.
KEY_WORDS = {
    "race": ("race", "race by birth"),
    "home": ("home", "home town"),
    "occupation": ("occupation", "trade"),
    "item": ("item", "signature item"),
    "ally": ("ally", "closest ally"),
    "rival": ("rival", "greatest rival"),
}
# {wh} is "what", or "who" for the people fields.
TRAIN_FRAMES = (
    "{Wh} is your {key}?",
    "Tell me your {key}.",
    "Tell me about your {key}.",
    "May I ask your {key}?",
    "I would like to know your {key}.",
    "So, {wh} is your {key}?",
)
EVAL_FRAMES = ("Could you share your {key}?", "I am curious about your {key}.", "{Wh} would you say your {key} is?")
# Natural wordings that fit one field only, kept few so that frames dominate.
TRAIN_EXTRA = {
    "race": ("What race are you?",),
    "home": ("Where are you from?", "Where do you live?"),
    "occupation": ("What do you do for a living?",),
    "item": ("What do you carry with you?",),
    "ally": ("Who stands by your side?",),
    "rival": ("Who do you compete with?",),
}
EVAL_EXTRA = {
    "race": ("Which race do you belong to?",),
    "home": ("Which town is your home?",),
    "occupation": ("What occupation do you follow?",),
    "item": ("Which item do you never travel without?",),
    "ally": ("Name your ally.",),
    "rival": ("Name your rival.",),
}


def _questions(frames: tuple[str, ...], extra: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Each field's questions: every frame with every key word of the field, then the extras."""
    questions = {}
    for f in FIELDS:
        wh = "who" if f in SOCIAL_FIELDS else "what"
        filled = (fr.format(key=k, wh=wh, Wh=wh.capitalize()) for fr in frames for k in KEY_WORDS[f])
        questions[f] = (*filled, *extra[f])
    return questions


TRAIN_QUESTIONS = _questions(TRAIN_FRAMES, TRAIN_EXTRA)
EVAL_QUESTIONS = _questions(EVAL_FRAMES, EVAL_EXTRA)
# First-person fact sentences without their final punctuation (the voice supplies the ending);
# each copies the fact verbatim.
ANSWERS = {
    "race": ("I am {a_race}", "I was born {a_race}", "My race? I am {a_race}"),
    "home": ("I hail from {home}", "My home is {home}", "I live in {home}"),
    # Not "I am a blacksmith": after "I am a" a tiny model cannot tell trade from race ("I am a goblin").
    "occupation": ("By trade, I am {a_occupation}", "I work as {a_occupation}", "My occupation is {occupation}"),
    "item": ("I carry {item}", "I never travel without {item}", "My signature item is {item}"),
    "ally": ("My ally is {ally}", "I trust {ally} above all", "My closest ally is {ally}"),
    "rival": ("My rival is {rival}", "I have a rival, and it is {rival}", "My greatest rival is {rival}"),
}
# Third-person fact sentences for the lore, several per fact so that phrasing varies. The card
# facts are told as prose, never labelled with the key words the questions use ("The race of X is
# goblin."): the lore teaches what is true, and only SFT teaches that "your race" asks for it, so
# split "facts" measures what fine-tuning adds (a pretrained-only model that was taught the
# labels answered a third of those questions by completing "The race of X is"). Ally and rival
# keep their key words: no card states them, and split "lore" asks for them from memory.
LORE_FACTS = {
    "race": (
        "{name} is {a_race}.",
        "{name} was born {a_race}.",
        "By blood, {name} is {a_race}.",
        "{name} comes of {race} folk.",
    ),
    "home": (
        "{name} lives in {home}.",
        "{name} comes from {home}.",
        "{name} grew up in {home}.",
        "{name} was raised in {home}.",
    ),
    "occupation": (
        "{name} works as {a_occupation}.",
        "By day, {name} is {a_occupation}.",
        "{name} earns a living as {a_occupation}.",
        "{name} has long been {a_occupation}.",
    ),
    "item": (
        "{name} carries {item}.",
        "{name} is never seen without {item}.",
        "{name} keeps {item} close.",
        "{Item} belongs to {name}.",
    ),
    "ally": (
        "The ally of {name} is {ally}.",
        "{name} trusts {ally} above all others.",
        "{ally} is the closest ally of {name}.",
        "{name} calls {ally} a true ally.",
    ),
    "rival": (
        "The rival of {name} is {rival}.",
        "{rival} is the great rival of {name}.",
        "{name} has never forgiven {rival}, a rival of old.",
        "{name} calls {rival} a bitter rival.",
    ),
}
# Overheard questions about a character, answered by a local with the fact (card fields without
# their key words, as above).
LORE_QUESTIONS = {
    "race": "Is {name} one of the old folk?",
    "home": "Where does {name} live?",
    "occupation": "What does {name} do all day?",
    "item": "What does {name} carry?",
    "ally": "Who is the ally of {name}?",
    "rival": "Who is the rival of {name}?",
}


def _names_key_word(template: str, field: str) -> bool:
    """Whether a template's own words (its {slots} aside) contain one of the field's key words."""
    words = re.sub(r"\{\w+\}", " ", template).lower()
    return any(re.search(rf"\b{k}\b", words) for k in KEY_WORDS[field])


# The first-person sentences of a character's letter: the chats' answers, less those that name a
# card field's key word ("My occupation is ...").
LETTER_SENTENCES = {f: tuple(a for a in ANSWERS[f] if f in SOCIAL_FIELDS or not _names_key_word(a, f)) for f in FIELDS}
LOCALS = ("the innkeeper", "an old woman", "the ferryman", "a guard", "the cook", "a young farmer")
CHRONICLE_ALLY = ("{ally}, the ally of {name}, went along.", "With {name} went {ally}, a loyal ally.")
CHRONICLE_RIVAL = ("But {rival}, the rival of {name}, tried to stop them.", "On the road they met {rival}.")
# A tavern song: one wording per line, chosen at random.
SONG_LINES = (
    ("Sing of {name}, {a_race} of {home},", "Raise a cup to {name} of {home},", "Hear of {name}, the {race} bold,"),
    (
        "who carries {item} wherever {name} may roam.",
        "with {item} held high and {home} far behind.",
        "and {item} that {name} will never sell.",
    ),
    (
        "{ally} is the ally who stands at the side,",
        "the ally {ally} walks by the side of {name},",
        "with {ally}, a true ally, close at hand,",
    ),
    (
        "and {rival} the rival {name} cannot abide.",
        "and {rival}, the rival, waits down the road.",
        "and {rival} the rival always near.",
    ),
)
RUMOURS = ("They say that", "Rumour has it that", "The children whisper that", "Everyone in {home} knows that")
# A traveller's guide to the land: the questions' key words in general sentences, never about one
# character, so that the tokenizer and the pretrained model know the words ("occupation" was
# split into six pieces by a tokenizer trained on lore without it) but not which fact of whom
# they ask for. {values} is the field's values in the world, in random order.
GUIDE_LINES = {
    "race": (
        "Every person of the land has a race by birth: {values}.",
        "The races of the land are {values}.",
        "Your race by birth never changes, whatever you do.",
        "Ask a stranger their race and you will hear one of these: {values}.",
    ),
    "home": (
        "The towns of the land are {values}.",
        "Every home town has an inn, and every home a hearth.",
        "Your home town will always call you back.",
        "Ask anyone where home is and you will hear one of these: {values}.",
    ),
    "occupation": (
        "The common trades are {values}.",
        "A good occupation feeds a family; the guilds know these: {values}.",
        "Your trade is your bread, say the guilds.",
        "Choose your occupation with care, for it is for life.",
    ),
    "item": (
        "Famous items of the land include {values}.",
        "Heroes carry a signature item and never part with it.",
        "Guard your signature item well, for thieves are everywhere.",
        "Never lend your item to a stranger.",
    ),
}
GUIDE_EVERY = 10
"""One lore document in this many is a traveller's guide rather than about a character."""
RESIDENT_LINES = (
    "{name} the {race} lives in {home} and works as {a_occupation}.",
    "In {home} you can find {name}, {a_occupation}.",
    "{name}, {a_race}, has a house in {home}.",
)


# --- the world -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Character:
    """One playable character; every field is a short string from a small pool."""

    name: str
    race: str
    home: str
    """The name of a town (a Place)."""
    occupation: str
    item: str
    """The signature item, with its article: "the Ember Lantern"."""
    catchphrase: str
    ally: str
    """Another character's name."""
    rival: str
    """Another character's name, not the ally."""
    voice: str
    """A key of VOICES."""


@dataclass(frozen=True)
class Place:
    """A town, with a one-line description."""

    name: str
    description: str


@dataclass(frozen=True)
class Quest:
    """A quest a character gives, in a town."""

    name: str
    giver: str
    place: str


@dataclass
class World:
    """Everything the lore, chats and questions are generated from."""

    characters: list[Character]
    places: list[Place]
    quests: list[Quest]

    def character(self, name: str) -> Character:
        """The character called `name`."""
        return next(c for c in self.characters if c.name == name)


def _rng(purpose: str, seed: int) -> random.Random:
    # One stream per purpose: adding documents never changes the chats, and a string seed is
    # hashed with SHA-512 (not Python's salted hash), so runs agree.
    return random.Random(f"{purpose}:{seed}")


def _fixed_text() -> str:
    """All the wording the generator uses, lowercased: invented names must not occur in it."""
    pools = [PLACE_DESCRIPTIONS, RACES, OCCUPATIONS, ITEM_ADJECTIVES, ITEM_NOUNS, CATCHPHRASES]
    pools += [QUEST_ADJECTIVES, QUEST_NOUNS, TIMES, LOCALS, TOWN_PREFIXES]
    templates = [TRAIN_QUESTIONS, EVAL_QUESTIONS, ANSWERS, LORE_FACTS]  # built from frames and key words
    words = [w for pool in pools for w in pool] + [w for t in templates for v in t.values() for w in v]
    words += list(LORE_QUESTIONS.values()) + [v.description for v in VOICES.values()]
    words += [w for lines in GUIDE_LINES.values() for w in lines]
    words += [w for v in VOICES.values() for w in v.openers + v.endings]
    words += [p + s for p in TOWN_PREFIXES for s in TOWN_SUFFIXES]
    return " ".join(words).lower()


def _invent_names(rng: random.Random, n: int) -> list[str]:
    """n names of two syllables, none inside another name or the generator's wording.

    No two names share their first or their last syllable, so that a tiny model does not mix
    them up, and the substring rule keeps "the expected name appears in the answer" unambiguous.
    """
    fixed = _fixed_text()
    for _ in range(1000):
        firsts, lasts = rng.sample(NAME_SYLLABLES, n), rng.sample(NAME_SYLLABLES, n)
        names = [(a + b).capitalize() for a, b in zip(firsts, lasts, strict=True)]
        low = [m.lower() for m in names]
        clash = any(a == b for a, b in zip(firsts, lasts, strict=True)) or any(m in fixed for m in low)
        if not clash and not any(a in b for a, b in itertools.permutations(low, 2)):
            return names
    raise ValueError(f"could not invent {n} distinct names from {len(NAME_SYLLABLES)} syllables")


def _make_places(rng: random.Random, n_characters: int) -> list[Place]:
    n = min(len(PLACE_DESCRIPTIONS), max(3, n_characters // 3 + 1))  # never more towns than people
    names = rng.sample([p + s for p in TOWN_PREFIXES for s in TOWN_SUFFIXES], n)
    return [Place(name, d) for name, d in zip(names, rng.sample(PLACE_DESCRIPTIONS, n), strict=True)]


def _distinct(rng: random.Random, parts: tuple[tuple[str, ...], ...], n: int, fmt: str) -> list[str]:
    """n distinct strings made by `fmt` from one element of each pool in `parts`."""
    combos = list(itertools.product(*parts))
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} distinct values for {fmt!r}, asked for {n}")
    return [fmt.format(*c) for c in rng.sample(combos, n)]


def make_world(seed: int = 0, n_characters: int = 16) -> World:
    """Draw a world: characters with distinct names, items and catchphrases, towns and quests.

    Args:
        seed: the random seed; the same seed gives the same world.
        n_characters: how many characters (at least 3, so that ally, rival and self differ).

    Returns:
        The World.
    """
    if not 3 <= n_characters <= MAX_CHARACTERS:
        # At least 3 so that self, ally and rival differ; at most one name syllable, item noun
        # and catchphrase each.
        raise ValueError(f"n_characters must be between 3 and {MAX_CHARACTERS}, got {n_characters}")
    rng = _rng("world", seed)
    names = _invent_names(rng, n_characters)
    places = _make_places(rng, n_characters)
    # Distinct nouns and catchphrases: every character's item and saying are its own.
    items = [f"the {rng.choice(ITEM_ADJECTIVES)} {noun}" for noun in rng.sample(ITEM_NOUNS, n_characters)]
    phrases = rng.sample(CATCHPHRASES, n_characters)
    # Every town is someone's home, so that every town is described in the lore.
    homes = [p.name for p in places] + [rng.choice(places).name for _ in range(n_characters - len(places))]
    rng.shuffle(homes)
    characters = []
    for name, item, phrase, home in zip(names, items, phrases, homes, strict=True):
        ally, rival = rng.sample([m for m in names if m != name], 2)
        characters.append(
            Character(
                name=name,
                race=rng.choice(RACES),
                home=home,
                occupation=rng.choice(OCCUPATIONS),
                item=item,
                catchphrase=phrase,
                ally=ally,
                rival=rival,
                voice=rng.choice(sorted(VOICES)),
            )
        )
    quest_names = _distinct(rng, (QUEST_ADJECTIVES, QUEST_NOUNS), n_characters, "the {} {}")
    quests = [Quest(q, c.name, rng.choice(places).name) for q, c in zip(quest_names, characters, strict=True)]
    return World(characters, places, quests)


# --- facts as text ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _slots(c: Character) -> dict[str, str]:
    """The template slots of a character: its fields plus forms with articles and capitals."""
    slots = asdict(c)
    slots.update(a_race=_article(c.race), a_occupation=_article(c.occupation), Item=c.item[0].upper() + c.item[1:])
    return slots


def character_card(c: Character) -> str:
    """The system prompt that puts the model in a character: the card fields, never ally or rival.

    Args:
        c: the character.

    Returns:
        The card text.
    """
    return (
        f"You are {c.name}, {_article(c.race)} {c.occupation} from {c.home}. You carry {c.item}. "
        f'Your catchphrase is "{c.catchphrase}" Speak as {c.name}: {VOICES[c.voice].description}.'
    )


def fact(c: Character, field: str) -> str:
    """The expected answer string of a field: the value itself (for ally/rival, the name).

    Args:
        c: the character.
        field: one of FIELDS.

    Returns:
        The fact as it appears verbatim in answers and lore.
    """
    return getattr(c, field)


def answer(rng: random.Random, c: Character, field: str) -> str:
    """An in-character answer about one field: an opener in the voice, the fact, maybe the catchphrase.

    Args:
        rng: the random stream.
        c: the character.
        field: one of FIELDS.

    Returns:
        The answer, e.g. "Hmph. I hail from Emberfall, of course. Steel remembers."
    """
    voice = VOICES[c.voice]
    body = rng.choice(ANSWERS[field]).format(**_slots(c)) + rng.choice(voice.endings)
    parts = [rng.choice(voice.openers)] if rng.random() < 0.8 else []
    parts.append(body)
    if rng.random() < 0.35:
        parts.append(c.catchphrase)
    return " ".join(parts)


def sft_field(index: int) -> str:
    """The one social field that SFT asks character number `index` about (alternating).

    Args:
        index: the character's position in World.characters.

    Returns:
        "ally" or "rival"; the other one is held out for split "lore".
    """
    return SOCIAL_FIELDS[index % 2]


def heldout_field(index: int) -> str:
    """The social field SFT never asks character number `index` about (split "lore").

    Args:
        index: the character's position in World.characters.

    Returns:
        "rival" or "ally".
    """
    return SOCIAL_FIELDS[1 - index % 2]


# --- lore ------------------------------------------------------------------------------------


def _normalized(text: str) -> str:
    # The form dedup.exact_key hashes (casefolded, whitespace collapsed; the text is ASCII, so NFC
    # changes nothing): two texts equal here are exact duplicates to the pipeline.
    return " ".join(text.split()).casefold()


def _say(rng: random.Random, c: Character, field: str) -> str:
    return rng.choice(LORE_FACTS[field]).format(**_slots(c))


def _encyclopedia(rng: random.Random, world: World, c: Character) -> str:
    """An encyclopedia entry: every fact of the character, in shuffled order."""
    head = rng.choice(("{name}", "{name} of {home}", "On {name}, the {race}")).format(**_slots(c))
    fields = list(FIELDS)
    rng.shuffle(fields)
    lines = [_say(rng, c, f) for f in fields]
    lines.append(f'The catchphrase of {c.name} is "{c.catchphrase}"')
    lines += [f"{c.name} gave the quest of {q.name} in {q.place}." for q in world.quests if q.giver == c.name]
    return head + "\n" + " ".join(lines)


def _chronicle(rng: random.Random, world: World, c: Character) -> str:
    """A short tale: the character sets out on a quest with the ally and meets the rival."""
    q, s = rng.choice(world.quests), _slots(c)
    lines = [
        f"{rng.choice(TIMES)}, {c.name} the {c.race} left {c.home}.",
        _say(rng, c, rng.choice(("occupation", "item"))),
        f"{q.giver} had given the quest of {q.name}, and the road led to {q.place}.",
        rng.choice(CHRONICLE_ALLY).format(**s),
        _say(rng, c, "ally"),
        rng.choice(CHRONICLE_RIVAL).format(**s),
        _say(rng, c, "rival"),
        f'At the end of the tale, {c.name} said: "{c.catchphrase}"',
    ]
    return " ".join(lines)


def _dialogue(rng: random.Random, world: World, c: Character) -> str:
    """Overheard talk at an inn: a traveller asks about the character, a local answers."""
    fields = ["ally", "rival", *rng.sample(CARD_FIELDS, 2)]
    rng.shuffle(fields)
    lines = [f"Overheard at the inn of {rng.choice(world.places).name}:"]
    for f in fields:
        local = rng.choice(LOCALS)
        reply = _say(rng, c, f)[:-1] + ","  # the quoted sentence ends in a comma before "said"
        lines.append(f'"{LORE_QUESTIONS[f].format(name=c.name)}" asked a traveller. "{reply}" said {local}.')
    return "\n".join(lines)


def _letter(rng: random.Random, world: World, c: Character) -> str:
    """A letter in the character's own words: first-person sentences as the chats' answers."""
    # Four facts, always including both social ones: ally and rival must be seen in first person.
    fields = [*SOCIAL_FIELDS, *rng.sample(CARD_FIELDS, 2)]
    rng.shuffle(fields)
    sentences = [rng.choice(LETTER_SENTENCES[f]).format(**_slots(c)) + "." for f in fields]
    return f"A letter from {c.name}:\n" + " ".join([*sentences, c.catchphrase])


def _mid_sentence(sentence: str) -> str:
    """A fact sentence to follow "They say that": "The ally of X" becomes "the ally of X"."""
    return "t" + sentence[1:] if sentence.startswith("The ") else sentence


def _song(rng: random.Random, world: World, c: Character) -> str:
    """A tavern song (each line in one of a few wordings) and the rumours that follow it."""
    s = _slots(c)
    verse = [rng.choice(options).format(**s) for options in SONG_LINES]
    rumours = [f"{rng.choice(RUMOURS).format(**s)} {_mid_sentence(_say(rng, c, f))}" for f in rng.sample(FIELDS, 2)]
    return "A song sung in the taverns:\n" + "\n".join(verse) + "\n" + " ".join(rumours)


def _place(rng: random.Random, world: World, c: Character) -> str:
    """A description of the character's home town, its people and its quests."""
    place = next(p for p in world.places if p.name == c.home)
    residents = [r for r in world.characters if r.home == place.name]
    rng.shuffle(residents)
    lines = [f"{place.name} is {place.description}."]
    lines += [rng.choice(RESIDENT_LINES).format(**_slots(r)) for r in residents]
    lines += [_say(rng, c, "ally"), _say(rng, c, "rival")]
    lines += [
        f"The quest of {q.name} is given by {q.giver} in {q.place}." for q in world.quests if q.place == place.name
    ]
    return " ".join(lines)


def _guide(rng: random.Random, world: World) -> str:
    """A traveller's guide: one or two general sentences on each of two or three card fields."""
    lines = []
    for f in rng.sample(CARD_FIELDS, rng.choice((2, 3))):
        values = sorted({getattr(c, f) for c in world.characters})
        rng.shuffle(values)
        lines += [t.format(values=", ".join(values)) for t in rng.sample(GUIDE_LINES[f], rng.choice((1, 2)))]
    rng.shuffle(lines)
    return "A guide for travellers:\n" + " ".join(lines)


DOCUMENT_KINDS = (_encyclopedia, _chronicle, _dialogue, _letter, _song, _place)


def _documents(rng: random.Random, world: World, n_docs: int) -> list[str]:
    """n_docs distinct documents: every GUIDE_EVERY-th a guide, the others each about one
    character (round robin) in one or two kinds."""
    docs, seen, about = [], set(), 0
    for _ in range(20 * n_docs):
        if len(docs) == n_docs:
            break
        guide = len(docs) % GUIDE_EVERY == GUIDE_EVERY - 1
        if guide:
            doc = _guide(rng, world)
        else:
            c = world.characters[about % len(world.characters)]
            doc = "\n\n".join(kind(rng, world, c) for kind in rng.sample(DOCUMENT_KINDS, rng.choice((1, 2, 2))))
        if _normalized(doc) in seen:  # the pipeline's exact deduplication would drop a repeat
            continue
        seen.add(_normalized(doc))
        docs.append(doc)
        about += not guide
    if len(docs) < n_docs:
        raise ValueError(f"only {len(docs)} distinct documents could be made of {n_docs} asked for")
    rng.shuffle(docs)
    return docs


def lore_documents(world: World, seed: int = 0, n_docs: int = 2000) -> list[str]:
    """Pretraining documents that state every fact of the world in varied phrasings.

    One document in GUIDE_EVERY is a traveller's guide (the questions' key words in general
    sentences); every character is the subject of an equal share of the others, and nearly every
    one states its ally and rival (the model must memorise them: no card states them).

    Args:
        world: the world.
        seed: the random seed.
        n_docs: how many documents.

    Returns:
        The document texts.
    """
    return _documents(_rng("lore", seed), world, n_docs)


def heldout_documents(world: World, seed: int = 0, n_docs: int = 100) -> list[str]:
    """Lore documents from another random stream, for held-out perplexity.

    Args:
        world: the world.
        seed: the random seed (the stream differs from lore_documents' with the same seed).
        n_docs: how many documents.

    Returns:
        The document texts.
    """
    return _documents(_rng("heldout", seed), world, n_docs)


# --- chats and evaluation --------------------------------------------------------------------


def _chat(rng: random.Random, c: Character, fields: tuple[str, ...]) -> dict:
    """One chat of 1–3 exchanges, each about a different field."""
    messages = [{"role": "system", "content": character_card(c)}]
    for f in rng.sample(fields, rng.choice((1, 2, 2, 3))):
        messages.append({"role": "user", "content": rng.choice(TRAIN_QUESTIONS[f])})
        messages.append({"role": "assistant", "content": answer(rng, c, f)})
    return {"messages": messages}


def _dedup_key(chat: dict) -> str:
    # As dedup.conversation_dedup_text: the system message aside.
    return _normalized("\n".join(f"{m['role']}: {m['content']}" for m in chat["messages"] if m["role"] != "system"))


def sft_conversations(world: World, seed: int = 0, n_per_character: int = 160) -> list[dict]:
    """Role-play chats in messages format: the card as system message, then 1–3 exchanges.

    Each exchange asks about a card field or the character's one SFT social field (sft_field);
    the answer copies the fact verbatim. Chats are unique in their user and assistant text, so
    exact deduplication drops none.

    Args:
        world: the world.
        seed: the random seed.
        n_per_character: chats per character (fewer if the templates run out of unique chats).

    Returns:
        `{"messages": [{"role", "content"}, ...]}` dicts, characters interleaved in random order.
    """
    rng, seen, chats = _rng("sft", seed), set(), []
    for i, c in enumerate(world.characters):
        fields, made = (*CARD_FIELDS, sft_field(i)), 0
        for _ in range(20 * n_per_character):
            chat = _chat(rng, c, fields)
            if _dedup_key(chat) in seen:
                continue
            seen.add(_dedup_key(chat))
            chats.append(chat)
            made += 1
            if made == n_per_character:
                break
    rng.shuffle(chats)
    return chats


def _eval_item(rng: random.Random, world: World, c: Character, field: str, question: str) -> dict:
    expected = fact(c, field)
    # Other values of the field: an answer that lists several towns (say) has not answered.
    others = {fact(o, field) for o in world.characters} - {expected}
    return {
        "character": c.name,
        "field": field,
        "messages": [{"role": "system", "content": character_card(c)}, {"role": "user", "content": question}],
        "expected": expected,
        "conflicts": sorted(v for v in others if v.lower() not in expected.lower()),
        "reference": answer(rng, c, field),
    }


def eval_items(world: World, seed: int = 0, per_field: int = 2) -> dict[str, list[dict]]:
    """The evaluation questions, in two splits.

    "facts": each card field of each character, asked `per_field` times in distinct EVAL
    wordings (never used in SFT). "lore": for each character, the social field SFT never asked
    it (heldout_field), so the answer must come from pretraining.

    Args:
        world: the world.
        seed: the random seed.
        per_field: questions per character and card field (at most the number of eval wordings).

    Returns:
        {"facts": items, "lore": items}; an item is {"character", "field", "messages" (system
        card + user question), "expected" (the fact string), "conflicts" (the field's other values
        in the world), "reference" (an in-character answer)}.
    """
    rng = _rng("eval", seed)
    facts = [
        _eval_item(rng, world, c, f, q)
        for c in world.characters
        for f in CARD_FIELDS
        for q in rng.sample(EVAL_QUESTIONS[f], per_field)
    ]
    lore = []
    for i, c in enumerate(world.characters):
        f = heldout_field(i)
        lore.append(_eval_item(rng, world, c, f, rng.choice(EVAL_QUESTIONS[f])))
    return {"facts": facts, "lore": lore}


def rl_prompts(world: World, seed: int = 0, per_character: int = 20) -> list[dict]:
    """Prompt rows for online RL (data_pipeline/prompts.py reads them; training/rewards.py scores
    the answers against their ground truth).

    Each character is asked about its card fields and the one social field SFT asked it
    (sft_field), in turn, each time in another SFT wording (TRAIN_QUESTIONS). RL never asks an EVAL
    wording, nor the social field held out for split "lore", so what the evaluation measures stays
    unseen by every training stage.

    Args:
        world: the world.
        seed: the random seed.
        per_character: prompts per character, spread evenly over its five fields (at most five
            times the fewest SFT wordings of a field).

    Returns:
        Rows shaped as eval_items': {"character", "field", "messages" (system card + user
        question), "expected", "conflicts", "reference"}, character by character.
    """
    fields_of = [(*CARD_FIELDS, sft_field(i)) for i in range(len(world.characters))]
    most = min(len(fs) * min(len(TRAIN_QUESTIONS[f]) for f in fs) for fs in fields_of)
    if not 1 <= per_character <= most:
        raise ValueError(
            f"per_character must be between 1 and {most} (the distinct SFT questions), got {per_character}"
        )
    rng = _rng("rl", seed)
    rows = []
    for c, fields in zip(world.characters, fields_of, strict=True):
        wordings = {f: rng.sample(TRAIN_QUESTIONS[f], len(TRAIN_QUESTIONS[f])) for f in fields}
        for k in range(per_character):
            f = fields[k % len(fields)]
            rows.append(_eval_item(rng, world, c, f, wordings[f][k // len(fields)]))
    return rows


# --- files -----------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def world_dict(world: World) -> dict:
    """The world as JSON-ready data: characters (with their card), places and quests.

    Args:
        world: the world.

    Returns:
        {"characters": [...], "places": [...], "quests": [...]}.
    """
    characters = [{**asdict(c), "card": character_card(c)} for c in world.characters]
    return {
        "characters": characters,
        "places": [asdict(p) for p in world.places],
        "quests": [asdict(q) for q in world.quests],
    }


def split_val(chats: list[dict], seed: int, fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
    """A seeded train / validation split that keeps the chats' order.

    Args:
        chats: the chats.
        seed: the random seed.
        fraction: the share that goes to validation (at least one chat).

    Returns:
        (train, val).
    """
    n_val = max(1, round(fraction * len(chats)))
    val = set(_rng("val", seed).sample(range(len(chats)), n_val))
    return [c for i, c in enumerate(chats) if i not in val], [c for i, c in enumerate(chats) if i in val]


def write_corpus(
    out_dir: str | Path,
    seed: int = 0,
    n_characters: int = 16,
    n_lore_docs: int = 2000,
    n_chats_per_character: int = 160,
) -> dict[str, Path]:
    """Generate a world and write everything the quick start trains and evaluates on.

    Files under out_dir: pretrain/lore.jsonl and heldout.jsonl ({"text"} per line; n_lore_docs
    and n_lore_docs / 20 documents), sft/train.jsonl and sft/val.jsonl (messages format; val is
    a seeded 5%), eval/facts.jsonl and eval/lore.jsonl (eval_items), rl_prompts.jsonl (rl_prompts),
    world.json.

    Args:
        out_dir: the output folder (created).
        seed: the random seed; the same seed gives byte-identical files.
        n_characters: characters in the world.
        n_lore_docs: pretraining documents.
        n_chats_per_character: SFT chats per character (train + val).

    Returns:
        The paths by name: lore, heldout, sft_train, sft_val, eval_facts, eval_lore, rl_prompts, world.
    """
    out = Path(out_dir)
    world = make_world(seed, n_characters)
    train, val = split_val(sft_conversations(world, seed, n_chats_per_character), seed)
    items = eval_items(world, seed)
    paths = {
        "lore": _write_jsonl(
            out / "pretrain" / "lore.jsonl", [{"text": t} for t in lore_documents(world, seed, n_lore_docs)]
        ),
        "heldout": _write_jsonl(
            out / "heldout.jsonl", [{"text": t} for t in heldout_documents(world, seed, max(1, n_lore_docs // 20))]
        ),
        "sft_train": _write_jsonl(out / "sft" / "train.jsonl", train),
        "sft_val": _write_jsonl(out / "sft" / "val.jsonl", val),
        "eval_facts": _write_jsonl(out / "eval" / "facts.jsonl", items["facts"]),
        "eval_lore": _write_jsonl(out / "eval" / "lore.jsonl", items["lore"]),
        "rl_prompts": _write_jsonl(out / "rl_prompts.jsonl", rl_prompts(world, seed)),
    }
    paths["world"] = out / "world.json"
    paths["world"].write_text(json.dumps(world_dict(world), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic game-world corpus of the quick start.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--characters", type=int, default=16, help="characters in the world (default 16)")
    args = parser.parse_args()
    for name, path in write_corpus(args.out, seed=args.seed, n_characters=args.characters).items():
        lines = path.read_text(encoding="utf-8").count("\n") if path.suffix == ".jsonl" else None
        print(f"{name:10s} {path}" + (f"  ({lines} records)" if lines is not None else ""))


if __name__ == "__main__":
    main()
