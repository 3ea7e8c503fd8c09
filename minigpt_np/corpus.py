"""A seeded generator of English sentences around verbs, labelled with tense and aspect.

Each example is one line, ``sentence => label``, e.g. ``she had swum across the lake =>
past perfect``. Labels are the 9 combinations of tense (past, present, future) and aspect
(simple, progressive, perfect). The verb phrase alone carries the label (auxiliaries and
verb forms: *swam*, *is swimming*, *will have swum*); adverbials are tense-neutral
(manner, place, company), so a model cannot read the answer off a time word.

The lexicon has 124 irregular verbs (hand-listed principal parts) and 200+ regular ones
whose forms follow the spelling rules: -s/-es/-ies, -ed/-d/-ied, -ing with e-dropping
(but *seeing*, *dyeing*), ie → y (*lying*), and final-consonant doubling for one-syllable
consonant-vowel-consonant verbs (*stop → stopped*) and for verbs stressed on a final
syllable (*prefer → preferred*), but not after two vowels or w/x/y (*rain*, *fix*, *play*).

Splits are deterministic from the seed: a held-out set of verbs appears in the training
split only in its base and -s forms (simple present, simple future, negations and
questions with do/did), and in the test split in all forms; test sentences never occur in
the training split.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np

from minigpt_np.model import EOT

TENSES = ("past", "present", "future")
ASPECTS = ("simple", "progressive", "perfect")
LABELS = tuple(f"{t} {a}" for t in TENSES for a in ASPECTS)
SEP = " => "

# base, past, past participle
IRREGULAR = [
    ("arise", "arose", "arisen"), ("awake", "awoke", "awoken"), ("bear", "bore", "borne"),
    ("beat", "beat", "beaten"), ("become", "became", "become"), ("begin", "began", "begun"),
    ("bend", "bent", "bent"), ("bet", "bet", "bet"), ("bind", "bound", "bound"), ("bite", "bit", "bitten"),
    ("bleed", "bled", "bled"), ("blow", "blew", "blown"), ("break", "broke", "broken"),
    ("breed", "bred", "bred"), ("bring", "brought", "brought"), ("build", "built", "built"),
    ("burst", "burst", "burst"), ("buy", "bought", "bought"), ("catch", "caught", "caught"),
    ("choose", "chose", "chosen"), ("cling", "clung", "clung"), ("come", "came", "come"),
    ("cost", "cost", "cost"), ("creep", "crept", "crept"), ("cut", "cut", "cut"), ("deal", "dealt", "dealt"),
    ("dig", "dug", "dug"), ("do", "did", "done"), ("draw", "drew", "drawn"), ("drink", "drank", "drunk"),
    ("drive", "drove", "driven"), ("eat", "ate", "eaten"), ("fall", "fell", "fallen"), ("feed", "fed", "fed"),
    ("feel", "felt", "felt"), ("fight", "fought", "fought"), ("find", "found", "found"), ("flee", "fled", "fled"),
    ("fling", "flung", "flung"), ("fly", "flew", "flown"), ("forbid", "forbade", "forbidden"),
    ("forget", "forgot", "forgotten"), ("forgive", "forgave", "forgiven"), ("freeze", "froze", "frozen"),
    ("get", "got", "gotten"), ("give", "gave", "given"), ("go", "went", "gone"), ("grind", "ground", "ground"),
    ("grow", "grew", "grown"), ("hang", "hung", "hung"), ("have", "had", "had"), ("hear", "heard", "heard"),
    ("hide", "hid", "hidden"), ("hit", "hit", "hit"), ("hold", "held", "held"), ("hurt", "hurt", "hurt"),
    ("keep", "kept", "kept"), ("kneel", "knelt", "knelt"), ("know", "knew", "known"),
    ("lead", "led", "led"), ("leave", "left", "left"), ("lend", "lent", "lent"), ("let", "let", "let"),
    ("lie", "lay", "lain"), ("light", "lit", "lit"), ("lose", "lost", "lost"), ("make", "made", "made"),
    ("mean", "meant", "meant"), ("meet", "met", "met"), ("pay", "paid", "paid"), ("put", "put", "put"),
    ("quit", "quit", "quit"), ("read", "read", "read"), ("ride", "rode", "ridden"), ("ring", "rang", "rung"),
    ("rise", "rose", "risen"), ("run", "ran", "run"), ("say", "said", "said"), ("see", "saw", "seen"),
    ("seek", "sought", "sought"), ("sell", "sold", "sold"), ("send", "sent", "sent"), ("set", "set", "set"),
    ("sew", "sewed", "sewn"), ("shake", "shook", "shaken"), ("shine", "shone", "shone"),
    ("shoot", "shot", "shot"), ("show", "showed", "shown"), ("shrink", "shrank", "shrunk"),
    ("shut", "shut", "shut"), ("sing", "sang", "sung"), ("sink", "sank", "sunk"), ("sit", "sat", "sat"),
    ("sleep", "slept", "slept"), ("slide", "slid", "slid"), ("sling", "slung", "slung"),
    ("speak", "spoke", "spoken"), ("spend", "spent", "spent"), ("spin", "spun", "spun"),
    ("split", "split", "split"), ("spread", "spread", "spread"), ("spring", "sprang", "sprung"),
    ("stand", "stood", "stood"), ("steal", "stole", "stolen"), ("stick", "stuck", "stuck"),
    ("sting", "stung", "stung"), ("stink", "stank", "stunk"), ("strike", "struck", "struck"),
    ("swear", "swore", "sworn"), ("sweep", "swept", "swept"), ("swim", "swam", "swum"),
    ("swing", "swung", "swung"), ("take", "took", "taken"), ("teach", "taught", "taught"),
    ("tear", "tore", "torn"), ("tell", "told", "told"), ("think", "thought", "thought"),
    ("throw", "threw", "thrown"), ("understand", "understood", "understood"), ("wake", "woke", "woken"),
    ("wear", "wore", "worn"), ("weave", "wove", "woven"), ("weep", "wept", "wept"), ("win", "won", "won"),
    ("wind", "wound", "wound"), ("write", "wrote", "written"),
]

REGULAR = """accept add admire admit agree allow answer appear arrange arrive ask attach attack attend
avoid bake balance ban bathe beg behave believe belong blink boil bolt borrow bounce bow box brush
bump burn call calm camp care carry carve cause change charge chase cheat check cheer chew chop clap
clean clear climb close coach collect comb command commit compare complain complete concentrate
confess connect consider contain continue control copy correct cough count cover crack crash crawl
cross crush cry cure curl cycle damage dance dare decide delay deliver depend describe deserve
destroy develop dream dress drip drop drown dry earn educate embarrass employ empty encourage enjoy
enter escape examine excite excuse exercise exist expand expect explain explode fail fasten fax fetch
file fill film fire fit fix flap flash float flood flow fold follow fool force form fry gather gaze
glow glue grab grate grease greet grin grip guard guess guide hammer hand handle happen harm hate
heat help hop hope hug hum hunt hurry identify ignore imagine improve include inform inject insist
instruct intend interest interrupt introduce invent invite irritate itch jam jog join joke judge juggle
jump kick kill kiss kneel knit knock knot label land last laugh launch learn level license lick like
list listen live load lock look love manage march mark marry match matter measure melt memorize mend
milk miss mix moan mourn move mug multiply murder nail name need nest nod note notice number obey
object observe obtain occur offer open order own pack paddle paint park part pass pause pedal peel
perform permit phone pick pinch plan plant play please plug point poke polish pop possess post pour
practise pray prefer prepare preserve press pretend prevent print produce promise protect
provide pull pump punch puncture punish push question queue race radiate rain raise reach realise
receive recognise record reduce refer reflect refuse regret reign reject rejoice relax release rely
remain remember remind remove repair repeat replace reply report reproduce request rescue retire
return rhyme rinse risk rob rock roll rot rub ruin rule rush sail satisfy save scare scatter
scold scorch scrape scratch scream screw scribble scrub seal search separate serve settle shade share
shave shelter shiver shock shop shrug sigh sign signal sin sip ski skip slap slip slow smash smell
smile smoke snatch sneeze sniff snore snow soak soothe sound spare spark sparkle spell spill spoil
spot spray sprout squash squeak squeal squeeze stain stamp stare start stay steer step stir stitch
stop store strap strengthen stretch strip stroke stuff subtract succeed suck suffer suggest suit
supply support suppose surprise surround suspect suspend switch talk tame tap taste tease telephone
tempt terrify test thank thaw tick tickle tie time tip tire touch tour tow trace trade train transport
trap travel treat tremble trick trip trot trouble trust try tug tumble turn twist type undress unfasten
unite unlock unpack untidy use vanish visit wail wait walk wander want warm warn wash waste watch water
wave weigh welcome whine whip whirl whisper whistle wink wipe wish wobble wonder work worry wrap wreck
wrestle wriggle yawn yell zip zoom""".split()

# regular verbs stressed on the last syllable: the final consonant doubles (prefer -> preferred)
STRESSED_FINAL = {"admit", "commit", "control", "occur", "permit", "prefer", "refer", "regret", "compel",
                  "equip", "patrol", "rebel", "submit", "transfer", "upset", "forget", "begin", "expel"}
VOWELS = set("aeiou")


def _doubles(base: str) -> bool:
    """Does the final consonant double before -ed/-ing? (stop, plan; prefer; not visit, rain, fix)."""
    if base in STRESSED_FINAL:
        return True
    if len(base) < 3 or base[-1] in VOWELS or base[-1] in "wxy":
        return False
    c1, v, c2 = base[-3], base[-2], base[-1]
    vowel_groups = sum(1 for i, ch in enumerate(base) if ch in VOWELS and (i == 0 or base[i - 1] not in VOWELS))
    return c1 not in VOWELS and v in VOWELS and c2 not in VOWELS and vowel_groups == 1


def third_person(base: str) -> str:
    """-s form: watches, fixes, buzzes, goes; carries, but plays; has, does."""
    special = {"have": "has", "do": "does", "go": "goes"}
    if base in special:
        return special[base]
    if base.endswith(("s", "x", "z", "ch", "sh", "o")):
        return base + "es"
    if base.endswith("y") and base[-2] not in VOWELS:
        return base[:-1] + "ies"
    return base + "s"


def past_regular(base: str) -> str:
    """-ed form: liked (e-drop), carried (-y), stopped (doubling), played, visited."""
    if base.endswith("e"):
        return base + "d"
    if base.endswith("y") and base[-2] not in VOWELS:
        return base[:-1] + "ied"
    if _doubles(base):
        return base + base[-1] + "ed"
    return base + "ed"


def present_participle(base: str) -> str:
    """-ing form: making (e-drop), seeing/agreeing/dyeing (kept e), lying (ie), stopping."""
    if base.endswith("ie"):
        return base[:-2] + "ying"
    if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) and base != "be":
        return base[:-1] + "ing"
    if _doubles(base):
        return base + base[-1] + "ing"
    return base + "ing"


@dataclass(frozen=True)
class Verb:
    base: str
    s: str
    past: str
    participle: str
    ing: str
    irregular: bool
    transitive: bool


def lexicon() -> list[Verb]:
    """All verbs with their five forms (irregular first, then regular, each sorted)."""
    irregular_bases = {b for b, _, _ in IRREGULAR}
    intransitive = {"arise", "arrive", "appear", "bow", "camp", "cough", "crawl", "cry", "dance", "exist",
                    "fall", "flee", "float", "go", "happen", "hop", "jog", "kneel", "laugh", "lie", "rain",
                    "rise", "run", "sigh", "sit", "ski", "sleep", "smile", "sneeze", "snore", "snow", "stand",
                    "swim", "travel", "wait", "walk", "wander", "weep", "yawn", "come", "sink", "shiver",
                    "tremble", "vanish", "wink", "grin", "queue", "retire", "relax", "rely", "remain",
                    "depend", "belong", "occur", "matter", "stay", "pause", "pray", "complain", "reign"}
    verbs = [Verb(b, third_person(b), p, pp, present_participle(b), True, b not in intransitive)
             for b, p, pp in sorted(IRREGULAR)]
    verbs += [Verb(b, third_person(b), past_regular(b), past_regular(b), present_participle(b), False,
                   b not in intransitive)
              for b in sorted(set(REGULAR) - irregular_bases)]
    return verbs


# subject: (text, person/number key) -- "1s", "2", "3s", "1p", "3p"
SUBJECTS = [("i", "1s"), ("you", "2"), ("he", "3s"), ("she", "3s"), ("it", "3s"), ("we", "1p"), ("they", "3p"),
            ("the teacher", "3s"), ("my sister", "3s"), ("our neighbour", "3s"), ("the old man", "3s"),
            ("a small child", "3s"), ("the doctor", "3s"), ("my parents", "3p"), ("the students", "3p"),
            ("those farmers", "3p"), ("the twins", "3p"), ("my friends", "3p"), ("tom", "3s"), ("anna", "3s")]
OBJECTS = ["the book", "a letter", "the old car", "some water", "the door", "a new song", "the red box",
           "the window", "a cake", "the map", "our dog", "the garden", "a picture", "the ball", "the money",
           "the plan", "a long story", "the bread", "the chair", "her coat", "the keys", "a small boat"]
ADVERBIALS = ["", "", "", "quietly", "slowly", "carefully", "again", "together", "in the park", "at home",
              "near the river", "with a friend", "in the kitchen", "by the window", "without a word",
              "in the morning", "at school", "on the bus", "under the tree", "very well"]

# the main verb's surface form in each tense/aspect (for statements with an -s subject, simple present uses "s")
FORM_OF = {"past simple": "past", "present simple": "s", "future simple": "base", "past progressive": "ing",
           "present progressive": "ing", "future progressive": "ing", "past perfect": "participle",
           "present perfect": "participle", "future perfect": "participle"}


def verb_phrase(verb: Verb, label: str, person: str, negative: bool, question: bool, subject: str) -> str:
    """Subject + verb phrase (questions invert the first auxiliary)."""
    tense, aspect = label.split()
    third = person == "3s"
    be_present = {"1s": "am", "3s": "is"}.get(person, "are")
    be_past = "was" if person in ("1s", "3s") else "were"
    if aspect == "simple":
        if tense == "future":
            aux, main = "will", verb.base
        elif negative or question:
            aux, main = ("did" if tense == "past" else ("does" if third else "do")), verb.base
        else:
            aux, main = None, (verb.past if tense == "past" else (verb.s if third else verb.base))
    elif aspect == "progressive":
        aux = {"past": be_past, "present": be_present, "future": "will"}[tense]
        main = ("be " if tense == "future" else "") + verb.ing
    else:
        aux = {"past": "had", "present": "has" if third else "have", "future": "will"}[tense]
        main = ("have " if tense == "future" else "") + verb.participle
    if aux is None:
        return f"{subject} {main}"
    neg = " not" if negative else ""
    return f"{aux} {subject}{neg} {main}" if question else f"{subject} {aux}{neg} {main}"


def sentence(verb: Verb, label: str, rng: random.Random) -> str:
    subject, person = rng.choice(SUBJECTS)
    if label in ("past simple", "present simple") and verb.base == verb.past and person != "3s":
        # "they put the book" would be past or present: use a subject that shows the tense
        subject, person = rng.choice([s for s in SUBJECTS if s[1] == "3s"])
    question = rng.random() < 0.2
    negative = rng.random() < 0.25
    words = [verb_phrase(verb, label, person, negative, question, subject)]
    if verb.transitive and rng.random() < 0.8:
        words.append(rng.choice(OBJECTS))
    adv = rng.choice(ADVERBIALS)
    if adv:
        words.append(adv)
    text = " ".join(words)
    if question:
        return text + " ?"
    return text


def line(text: str, label: str) -> str:
    return f"{text}{SEP}{label}"


@dataclass(frozen=True)
class Splits:
    train: list[str]
    validation: list[str]
    test: list[str]
    heldout_verbs: frozenset[str]
    test_verbs: list[str]  # the base form of each test line's verb


def make_splits(n_train: int = 60000, n_val: int = 2000, n_test: int = 3000, seed: int = 0,
                heldout_fraction: float = 0.1) -> Splits:
    """Deterministic train / validation / test lines (see the module docstring). Drawn once
    per process and argument set (about 2 s for the default sizes); every call gets its own
    lists."""
    s = _draw_splits(n_train, n_val, n_test, seed, heldout_fraction)
    return Splits(list(s.train), list(s.validation), list(s.test), s.heldout_verbs, list(s.test_verbs))


@functools.lru_cache(maxsize=4)
def _draw_splits(n_train: int, n_val: int, n_test: int, seed: int, heldout_fraction: float) -> Splits:
    rng = random.Random(seed)
    verbs = lexicon()
    heldout = frozenset(v.base for v in rng.sample(verbs, int(len(verbs) * heldout_fraction)))
    base_only = [lab for lab in LABELS if FORM_OF[lab] in ("base", "s")]

    def draw(n, train: bool, exclude=frozenset()):
        out, bases, seen = [], [], set()
        while len(out) < n:
            v = rng.choice(verbs)
            label = rng.choice(base_only if (train and v.base in heldout) else LABELS)
            ln = line(sentence(v, label, rng), label)
            if ln not in exclude and ln not in seen:
                seen.add(ln)
                out.append(ln)
                bases.append(v.base)
        return out, bases

    train, _ = draw(n_train, True)
    train_set = frozenset(train)
    validation, _ = draw(n_val, False, train_set)
    test, test_verbs = draw(n_test, False, train_set | frozenset(validation))
    return Splits(train, validation, test, heldout, test_verbs)


def parse(ln: str) -> tuple[str, str]:
    """``"sentence => label"`` -> (sentence, label)."""
    text, label = ln.rsplit(SEP, 1)
    return text, label


def token_stream(lines: list[str]) -> np.ndarray:
    """[EOT] line \\n [EOT] line \\n ... as uint16 tokens."""
    out = []
    for ln in lines:
        out.append(EOT)
        out.extend((ln + "\n").encode("utf-8"))
    return np.array(out, np.uint16)
