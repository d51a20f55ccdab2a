"""Yes/no object questions derived from captions, in the style of POPE (Li et al., EMNLP 2023).

POPE asks "Is there a {category} in the image?" about the 80 COCO object categories, with "yes"
for categories the image's instance labels contain and "no" for absent ones. Caption datasets
(Flickr8k, CC3M) have no instance labels, so here a category counts as present when one of the
image's captions names it (by the caption words listed per category below) and as absent when
none does. Presence is reliable (annotators do not describe objects that are not there); absence
is noisier, since captions leave small or background objects unnamed.

The result is a Karpathy JSON whose images carry "qa" lists: stage 2 trains on them with
`stage2.use_qa: true`, and `blip2 eval vqa` scores a split of them with accuracy/F1.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from blip2.io import atomic_write_text

# The 80 COCO categories (POPE asks with these names verbatim) and the caption words that name them.
# Words match whole words, case-insensitively; listed plural forms are matched as written.
# Deliberately left out: words that are mostly something else in captions ("orange" the colour,
# "glove" the winter glove, "plant" any vegetation, "mouse" the animal, "crane" the machine) or that
# name a game more than a ball ("football", "basketball", "baseball" as in "baseball cap").
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("person", "persons", "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls",
               "child", "children", "kid", "kids", "baby", "babies", "toddler", "toddlers", "lady", "ladies",
               "guy", "guys", "adult", "adults", "teenager", "teenagers", "teen", "teens", "player", "players",
               "skier", "skiers", "surfer", "surfers", "snowboarder", "skateboarder", "skateboarders", "biker",
               "bikers", "cyclist", "cyclists", "rider", "riders", "swimmer", "swimmers", "runner", "runners",
               "climber", "climbers", "crowd", "someone", "gentleman", "youngster", "infant"),
    "bicycle": ("bicycle", "bicycles", "bike", "bikes", "cyclist", "cyclists", "bmx"),
    "car": ("car", "cars", "taxi", "jeep", "suv"),
    "motorcycle": ("motorcycle", "motorcycles", "motorbike", "motorbikes", "dirt bike", "dirt bikes", "motocross",
                   "moped", "scooter"),
    "airplane": ("airplane", "airplanes", "plane", "planes", "aircraft", "jet", "jets", "jetliner"),
    "bus": ("bus", "buses"),
    "train": ("train", "trains", "locomotive", "subway train"),
    "truck": ("truck", "trucks", "pickup truck", "lorry"),
    "boat": ("boat", "boats", "canoe", "canoes", "kayak", "kayaks", "raft", "rafts", "sailboat", "sailboats",
             "ship", "ships", "yacht", "rowboat"),
    "traffic light": ("traffic light", "traffic lights", "stoplight"),
    "fire hydrant": ("fire hydrant", "hydrant", "hydrants"),
    "stop sign": ("stop sign", "stop signs"),
    "parking meter": ("parking meter", "parking meters"),
    "bench": ("bench", "benches"),
    "bird": ("bird", "birds", "duck", "ducks", "seagull", "seagulls", "gull", "gulls", "pigeon", "pigeons",
             "goose", "geese", "swan", "swans", "parrot", "chicken", "chickens", "pelican", "heron"),
    "cat": ("cat", "cats", "kitten", "kittens", "kitty"),
    "dog": ("dog", "dogs", "puppy", "puppies", "pup", "pups", "poodle", "poodles", "terrier", "terriers",
            "retriever", "retrievers", "collie", "dachshund", "greyhound", "greyhounds", "labrador", "lab",
            "pitbull", "beagle", "spaniel", "husky", "huskies", "chihuahua", "bulldog", "sheepdog", "rottweiler",
            "dalmatian", "doberman", "german shepherd", "pug", "schnauzer", "boxer dog"),
    "horse": ("horse", "horses", "pony", "ponies", "foal", "stallion"),
    "sheep": ("sheep", "lamb", "lambs"),
    "cow": ("cow", "cows", "cattle", "bull", "bulls", "calf", "calves", "ox", "oxen"),
    "elephant": ("elephant", "elephants"),
    "bear": ("bear", "bears"),
    "zebra": ("zebra", "zebras"),
    "giraffe": ("giraffe", "giraffes"),
    "backpack": ("backpack", "backpacks", "rucksack", "knapsack"),
    "umbrella": ("umbrella", "umbrellas", "parasol"),
    "handbag": ("handbag", "handbags", "purse", "purses"),
    "tie": ("tie", "ties", "necktie", "bowtie", "bow tie"),
    "suitcase": ("suitcase", "suitcases", "luggage"),
    "frisbee": ("frisbee", "frisbees"),
    "skis": ("ski", "skis", "skier", "skiers", "skiing"),
    "snowboard": ("snowboard", "snowboards", "snowboarder", "snowboarders", "snowboarding"),
    "sports ball": ("ball", "balls"),
    "kite": ("kite", "kites"),
    "baseball bat": ("baseball bat", "bat", "bats"),
    "baseball glove": ("baseball glove", "mitt", "catcher's mitt"),
    "skateboard": ("skateboard", "skateboards", "skateboarder", "skateboarders", "skateboarding"),
    "surfboard": ("surfboard", "surfboards", "surfer", "surfers", "surfing", "boogie board", "bodyboard"),
    "tennis racket": ("racket", "rackets", "racquet", "racquets"),
    "bottle": ("bottle", "bottles"),
    "wine glass": ("wine glass", "wine glasses", "wineglass"),
    "cup": ("cup", "cups", "mug", "mugs"),
    "fork": ("fork", "forks"),
    "knife": ("knife", "knives"),
    "spoon": ("spoon", "spoons"),
    "bowl": ("bowl", "bowls"),
    "banana": ("banana", "bananas"),
    "apple": ("apple", "apples"),
    "sandwich": ("sandwich", "sandwiches"),
    "orange": ("oranges",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot", "carrots"),
    "hot dog": ("hot dog", "hot dogs", "hotdog", "hotdogs"),
    "pizza": ("pizza", "pizzas"),
    "donut": ("donut", "donuts", "doughnut", "doughnuts"),
    "cake": ("cake", "cakes", "cupcake", "cupcakes"),
    "chair": ("chair", "chairs", "stool", "stools", "wheelchair"),
    "couch": ("couch", "couches", "sofa", "sofas"),
    "potted plant": ("potted plant", "potted plants", "houseplant", "flower pot", "flowerpot"),
    "bed": ("bed", "beds"),
    "dining table": ("table", "tables", "dining table"),
    "toilet": ("toilet", "toilets"),
    "tv": ("tv", "television", "televisions"),
    "laptop": ("laptop", "laptops"),
    "mouse": ("computer mouse",),
    "remote": ("remote", "remote control"),
    "keyboard": ("keyboard", "keyboards"),
    "cell phone": ("cell phone", "cellphone", "cellphones", "phone", "phones", "mobile phone", "smartphone"),
    "microwave": ("microwave",),
    "oven": ("oven", "ovens", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink", "sinks"),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book", "books"),
    "clock": ("clock", "clocks"),
    "vase": ("vase", "vases"),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy bears", "teddy"),
    "hair drier": ("hair drier", "hair dryer", "blow dryer"),
    "toothbrush": ("toothbrush", "toothbrushes"),
}
# Phrases whose words would otherwise name the wrong category ("teddy bear" is not a bear).
_MASKS = ("teddy bear", "teddy bears", "dirt bike", "dirt bikes", "hot dog", "hot dogs", "bat mitzvah",
          "table tennis", "jet ski", "jet skis", "tie-dye", "tie dye", "tie-dyed", "tie dyed")
QUESTION = "Is there a {} in the image?"  # POPE's template, verbatim ("a apple" included)
_CATEGORY_OF = {QUESTION.format(c): c for c in CATEGORY_WORDS}


def _pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    alts = sorted((re.escape(w).replace(r"\ ", r"\s+") for w in words), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alts) + r")\b", re.IGNORECASE)


_PATTERNS = {c: _pattern(w) for c, w in CATEGORY_WORDS.items()}
_MASK = _pattern(_MASKS)


def mentioned_categories(captions: list[str]) -> set[str]:
    """COCO categories named by at least one caption (a masking phrase keeps only its own category)."""
    found: set[str] = set()
    for cap in captions:
        for phrase in _MASK.findall(cap):  # e.g. "hot dog" names the food, never the dog
            found |= {c for c, p in _PATTERNS.items() if p.fullmatch(phrase.strip())}
        text = _MASK.sub(" ", cap)
        found |= {c for c, p in _PATTERNS.items() if p.search(text)}
    return found


def _weighted_sample(rng: random.Random, items: list[str], weights: list[float], k: int) -> list[str]:
    """k distinct items, each draw proportional to weight among those not yet drawn."""
    items, weights, out = list(items), list(weights), []
    for _ in range(min(k, len(items))):
        j = rng.choices(range(len(items)), weights=weights)[0]
        out.append(items.pop(j))
        weights.pop(j)
    return out


def derive_questions(captions_per_image: list[list[str]], per_image: int = 3, negatives: str = "frequency",
                     seed: int = 0) -> list[list[tuple[str, str]]]:
    """For each image: up to `per_image` named categories ("yes") and as many unnamed ones ("no").

    negatives="random" draws absent categories uniformly (POPE's random setting). "frequency" draws
    them in proportion to how many images name the category, so each category is asked about with
    "yes" and "no" about equally often and the question alone does not give the answer away; POPE's
    "popular" setting (the most frequent absent categories) is the deterministic cousin of this.
    """
    if negatives not in ("random", "frequency"):
        raise ValueError(f"negatives must be 'random' or 'frequency', not {negatives!r}")
    if per_image < 1:
        raise ValueError("per_image must be at least 1")
    rng = random.Random(seed)
    present = [mentioned_categories(caps) for caps in captions_per_image]
    freq = Counter(c for p in present for c in p)
    out = []
    for cats in present:
        yes = rng.sample(sorted(cats), min(per_image, len(cats)))
        absent = [c for c in CATEGORY_WORDS if c not in cats]
        weights = [1.0 if negatives == "random" else freq[c] + 1.0 for c in absent]
        no = _weighted_sample(rng, absent, weights, len(yes))
        qa = [(QUESTION.format(c), "yes") for c in yes] + [(QUESTION.format(c), "no") for c in no]
        rng.shuffle(qa)
        out.append(qa)
    return out


def add_yesno_questions(karpathy: str | Path, out: str | Path, per_image: int = 3, negatives: str = "frequency",
                        seed: int = 0) -> dict[str, Any]:
    """Write a copy of a Karpathy JSON whose images carry derived yes/no "qa" lists; returns counts.

    Each split is derived on its own (category frequencies included), so no split's captions shape
    another's questions. Existing "qa" lists are kept and the derived questions appended.
    """
    src = Path(karpathy)
    doc = json.loads(src.read_text())
    if "images" not in doc:
        raise ValueError(f"{src} is not Karpathy-style JSON (no top-level 'images' list)")
    by_split: dict[str, list[dict]] = {}
    for e in doc["images"]:
        by_split.setdefault(e.get("split", ""), []).append(e)
    report: dict[str, Any] = {"source": str(src), "per_image": per_image, "negatives": negatives, "seed": seed,
                              "splits": {}}
    for split, entries in sorted(by_split.items()):
        caps = [[s["raw"] for s in e.get("sentences", [])] for e in entries]
        qa = derive_questions(caps, per_image, negatives, seed)
        yes_by_cat: Counter[str] = Counter()
        no_by_cat: Counter[str] = Counter()
        for e, pairs in zip(entries, qa, strict=True):
            e["qa"] = list(e.get("qa", [])) + [{"question": q, "answer": a} for q, a in pairs]
            for q, a in pairs:
                (yes_by_cat if a == "yes" else no_by_cat)[_CATEGORY_OF[q]] += 1
        report["splits"][split or "(none)"] = {
            "images": len(entries), "images_with_questions": sum(bool(p) for p in qa),
            "questions": sum(len(p) for p in qa), "yes": sum(yes_by_cat.values()), "no": sum(no_by_cat.values()),
            "top_categories": {c: [yes_by_cat[c], no_by_cat[c]] for c, _ in yes_by_cat.most_common(8)}}
    doc["yesno_derivation"] = {k: v for k, v in report.items() if k != "splits"}
    atomic_write_text(out, json.dumps(doc))
    return report
