"""Scenes of the shapes world: palette, shapes, sizes, captions, prompt categories and the held-out split.

A `Scene` is a background colour and 1-4 objects (shape, colour, size, centre, rotation) together with
what its caption says about them: its GenEval-style `category`, whether colours and sizes are named,
and for the position category the stated relation. `sample_scene(seed, split)` draws one
deterministically; the "train" split never contains a held-out colour-shape pair or states a
held-out relation, the "eval" split draws from the whole world (see docs/shapes.md).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace

from ..errors import InputError, unknown_choice

# Object colours, RGB. Chosen so that every pair is >= 40 apart in CIELAB (Delta E 1976) and every
# colour is >= 40 from every background, which keeps nearest-palette colour naming unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 215, 30),
    "green": (30, 160, 50),
    "cyan": (0, 195, 215),
    "blue": (30, 90, 235),
    "purple": (140, 40, 160),
    "pink": (250, 125, 195),
}
# Backgrounds are neutral (zero chroma), objects are saturated: the two never mix up.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 70),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# Size = the object's scale s as a fraction of the image's shorter side; each shape's outline is
# drawn at s times its unit outline (see render.UNIT_OUTLINES), whose areas are roughly equal.
SIZES: dict[str, float] = {"small": 0.065, "medium": 0.095, "large": 0.13}
# Rotational symmetry order of each shape: rotations are drawn in [0, 360 / order) degrees.
SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "cross": 4}
# Circumradius of each unit outline (scale 1): bounds the object for the no-overlap test.
EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.25, "star": 1.25, "cross": 1.115}

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 4

# The held-out split. These colour-shape pairs never appear in a training scene (neither named in
# a caption nor drawn unnamed), and these relations (canonical form: A left of B / A above B) are
# never stated in a training caption; evaluation prompts test both.
HELD_OUT_PAIRS = frozenset(
    {("green", "star"), ("blue", "triangle"), ("red", "cross"), ("yellow", "circle"), ("purple", "square")}
)
HELD_OUT_RELATIONS = frozenset(
    {
        ("triangle", "above", "circle"),
        ("star", "left of", "square"),
        ("circle", "left of", "cross"),
        ("cross", "above", "star"),
    }
)
SPLITS = {"train": 1, "eval": 2, "video": 3}

_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
_REL_PHRASES = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "above", "higher than"),
    "below": ("below", "under", "beneath"),
}
# Caption templates per category; {a}, {b} are object phrases ("a small red star"), {n} a number
# word, {things} a plural noun phrase, {rel} a relation phrase.
TEMPLATES = {
    "single_object": (
        "{a}",
        "a picture of {a}",
        "an image of {a}",
        "{a} on a plain background",
        "there is {a}",
    ),
    "two_object": (
        "{a} and {b}",
        "a picture of {a} and {b}",
        "{a} together with {b}",
        "an image with {a} and {b}",
    ),
    "counting": (
        "{n} {things}",
        "a picture of {n} {things}",
        "there are {n} {things}",
        "an image with {n} {things}",
    ),
    "colors": ("{a}", "a picture of {a}", "an image of {a}", "there is {a}"),
    "position": (
        "{a} {rel} {b}",
        "a picture of {a} {rel} {b}",
        "{a} is {rel} {b}",
        "an image with {a} {rel} {b}",
    ),
    "color_attr": ("{a} and {b}", "a picture of {a} and {b}", "{a} next to {b}", "an image with {a} and {b}"),
}


@dataclass(frozen=True)
class ShapeObject:
    """One object: shape, colour and size names, centre (x, y) as fractions of width/height, rotation in degrees."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    rotation: float = 0.0

    def __post_init__(self):
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.color, PALETTE)
        _check_choice("size", self.size, SIZES)
        for name in ("x", "y", "rotation"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"object {name} must be a finite number, got {value!r}")

    @property
    def radius(self) -> float:
        """Circumradius as a fraction of the image's shorter side."""
        return SIZES[self.size] * EXTENT[self.shape]


@dataclass(frozen=True)
class Scene:
    """A background and 1-4 objects, plus what the caption states about them (see module docstring)."""

    objects: tuple[ShapeObject, ...]
    background: str = "white"
    category: str = "single_object"
    mention_color: bool = True
    mention_size: bool = False
    relation: str | None = None  # position category: objects[0] <relation> objects[1]
    template: int = 0

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_choice("background", self.background, BACKGROUNDS)
        _check_choice("category", self.category, CATEGORIES)
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise InputError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.category == "position":
            _check_choice("relation", self.relation, RELATIONS)
        if self.category == "counting" and len({o.shape for o in self.objects}) != 1:
            raise InputError("the objects of a counting scene all have the same shape")
        needs = {"single_object": 1, "colors": 1, "two_object": 2, "position": 2, "color_attr": 2}
        if self.category in needs and len(self.objects) != needs[self.category]:
            raise InputError(
                f"a {self.category} scene has {needs[self.category]} objects, got {len(self.objects)}"
            )

    # -- captions -----------------------------------------------------------------------------

    def caption(self) -> str:
        """The natural-language caption: what the scene's category states, in one of its templates."""
        objs = self.objects
        cat = self.category
        color = self.mention_color or cat in ("colors", "color_attr")
        templates = TEMPLATES[cat]
        template = templates[self.template % len(templates)]
        if cat == "counting":
            first = objs[0]
            adj = _adjectives(
                first, color and _all_same(objs, "color"), self.mention_size and _all_same(objs, "size")
            )
            if len(objs) == 1:  # "there is a single star", not "there are one stars"
                n_word = ("one", "a single", "exactly one")[self.template % 3]
                return template.replace("there are", "there is").format(
                    n=n_word, things=f"{adj}{first.shape}"
                )
            return template.format(n=_NUMBERS[len(objs)], things=f"{adj}{PLURALS[first.shape]}")
        a = _phrase(objs[0], color, self.mention_size)
        if cat in ("single_object", "colors"):
            return template.format(a=a)
        b = _phrase(objs[1], color, self.mention_size)
        if cat == "position":
            phrases = _REL_PHRASES[self.relation]
            rel = phrases[(self.template // len(templates)) % len(phrases)]
            return template.format(a=a, b=b, rel=rel)
        return template.format(a=a, b=b)

    def stated_pairs(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs the caption names."""
        if not (self.mention_color or self.category in ("colors", "color_attr")):
            return set()
        if self.category == "counting" and not _all_same(self.objects, "color"):
            return set()
        return {(o.color, o.shape) for o in self.objects}

    def stated_relation(self) -> tuple[str, str, str] | None:
        """The stated relation in canonical form (A, "left of" | "above", B), or None."""
        if self.category != "position":
            return None
        return canonical_relation(self.objects[0].shape, self.relation, self.objects[1].shape)

    def is_held_out(self) -> bool:
        """Whether the caption asks for a held-out colour-shape pair or a held-out relation."""
        return bool(self.stated_pairs() & HELD_OUT_PAIRS) or self.stated_relation() in HELD_OUT_RELATIONS

    # -- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-ready dict (the scene spec written to prompts.jsonl)."""
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Build a scene from `to_dict` output, validating every name."""
        if not isinstance(d, dict) or "objects" not in d:
            raise InputError(f"a scene spec is a dict with an 'objects' list, got {str(d)[:80]!r}")
        allowed = {
            "objects",
            "background",
            "category",
            "mention_color",
            "mention_size",
            "relation",
            "template",
        }
        unknown = set(d) - allowed
        if unknown:
            raise InputError(f"unknown scene key(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
        obj_keys = {"shape", "color", "size", "x", "y", "rotation"}
        objects = []
        for o in d["objects"]:
            if (
                not isinstance(o, dict)
                or set(o) - obj_keys
                or not {"shape", "color", "size", "x", "y"} <= set(o)
            ):
                raise InputError(f"an object spec has keys {sorted(obj_keys)} (rotation optional), got {o!r}")
            objects.append(ShapeObject(**o))
        return cls(**{**d, "objects": tuple(objects)})

    def to_json(self) -> str:
        """The scene spec as one JSON line."""
        return json.dumps(self.to_dict(), separators=(",", ":"))


def _check_choice(kind: str, name, choices) -> None:
    if not isinstance(name, str) or name not in choices:  # a list or dict name is unhashable: check the type first
        raise unknown_choice(kind, name, choices)


def check_scene(scene: object, what: str) -> Scene:
    """Return `scene` if it is a `Scene`, else raise an InputError saying what `what` needs."""
    if not isinstance(scene, Scene):
        raise InputError(f"{what} needs a Scene (from sample_scene(seed) or Scene.from_dict(spec)), "
                         f"got {type(scene).__name__} {scene!r:.60}")
    return scene


def _all_same(objs, attr: str) -> bool:
    return len({getattr(o, attr) for o in objs}) == 1


def _adjectives(obj: ShapeObject, color: bool, size: bool) -> str:
    words = ([obj.size] if size else []) + ([obj.color] if color else [])
    return "".join(w + " " for w in words)


def _phrase(obj: ShapeObject, color: bool, size: bool) -> str:
    """'a small red star', 'an orange circle'."""
    words = _adjectives(obj, color, size) + obj.shape
    return ("an " if words[0] in "aeiou" else "a ") + words


# 'A <relation> B' says the same as 'B <inverse> A'.
INVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def canonical_relation(a: str, relation: str, b: str) -> tuple[str, str, str]:
    """Write 'A right of B' as (B, 'left of', A) and 'A below B' as (B, 'above', A)."""
    if relation in ("right of", "below"):
        return (b, INVERSE_RELATIONS[relation], a)
    return (a, relation, b)


def relation_holds(
    a: tuple[float, float], b: tuple[float, float], relation: str, margin: float = 0.05
) -> bool:
    """Whether centre `a` is `relation` centre `b` by at least `margin` (fractions of the image side)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[
        relation
    ]


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64), so derived streams never line up."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h >> 1


def _rng(seed: int, split: str) -> random.Random:
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return random.Random(derive_seed(SPLITS[split], seed))


def _allowed_colors(shape: str, split: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return [c for c in PALETTE if c not in exclude and (split != "train" or (c, shape) not in HELD_OUT_PAIRS)]


def _rotation(rng: random.Random, shape: str) -> float:
    order = SYMMETRY[shape]
    return round(rng.uniform(0.0, 360.0 / order), 2) if order else 0.0


def _place(rng: random.Random, specs: list[tuple[str, str, str]], relation: str | None = None):
    """Centres for objects (shape, colour, size) with no overlaps, inside the frame; None if it fails.

    With a relation, objects[0] is placed `relation` objects[1] along that axis, by a clear margin,
    and the other axis differs by at most half as much, so the relation is unambiguous.
    """
    margin = 0.02
    radii = [SIZES[s] * EXTENT[sh] for sh, _, s in specs]
    for _ in range(60):
        centres = []
        ok = True
        for i, r in enumerate(radii):
            for _ in range(30):
                x, y = rng.uniform(r + margin, 1 - r - margin), rng.uniform(r + margin, 1 - r - margin)
                if relation is not None and i == 1:
                    ax, ay = centres[0]
                    d = {
                        "left of": (x - ax, y - ay),
                        "right of": (ax - x, y - ay),
                        "above": (y - ay, x - ax),
                        "below": (ay - y, x - ax),
                    }[relation]
                    along, across = d
                    if along < 0.2 or abs(across) > 0.5 * along:
                        continue
                if all(
                    math.hypot(x - cx, y - cy) > r + radii[j] + margin for j, (cx, cy) in enumerate(centres)
                ):
                    centres.append((x, y))
                    break
            else:
                ok = False
                break
        if ok:
            return centres
    return None


def sample_scene(
    seed: int, split: str = "train", category: str | None = None, held_out: bool | None = None
) -> Scene:
    """Draw a scene deterministically from `seed` in `split` ("train" | "eval").

    `category` fixes the prompt category (default: drawn from the seed). In the eval split,
    `held_out=True` forces a held-out combination into the caption (colors, color_attr and position
    only), `False` forbids one, None leaves it to chance.
    """
    rng = _rng(seed, split)
    if category is None:
        category = rng.choice(CATEGORIES)
    elif category not in CATEGORIES:
        raise unknown_choice("category", category, CATEGORIES)
    if held_out and (split == "train" or category not in ("colors", "color_attr", "position")):
        raise InputError(
            f"held-out prompts exist only in the eval split for colors, color_attr and position; "
            f"got split={split!r} category={category!r}"
        )
    for _ in range(200):
        scene = _draw(rng, split, category, held_out)
        if scene is not None and (held_out is None or scene.is_held_out() == held_out):
            return scene
    raise RuntimeError(
        f"could not sample a {category} scene (seed {seed}, held_out={held_out})"
    )  # pragma: no cover


def _draw(rng: random.Random, split: str, category: str, held_out: bool | None) -> Scene | None:
    size = lambda: rng.choice(list(SIZES))  # noqa: E731
    mention_color = rng.random() < 0.5
    if split == "eval":  # GenEval conventions: colours are named only where the category tests them
        mention_color = {"single_object": False, "two_object": False, "counting": False}.get(
            category, mention_color
        )
    mention_size = split == "train" and rng.random() < 0.3
    relation = None
    if category in ("single_object", "colors"):
        if held_out:
            color, shape = rng.choice(sorted(HELD_OUT_PAIRS))
        else:
            shape = rng.choice(SHAPES)
            color = rng.choice(_allowed_colors(shape, split))
        specs = [(shape, color, size())]
    elif category in ("two_object", "color_attr", "position"):
        s1, s2 = rng.sample(SHAPES, 2) if category != "position" else (rng.choice(SHAPES), rng.choice(SHAPES))
        if category == "position":
            relation = rng.choice(RELATIONS)
            if held_out and rng.random() < 0.5:
                a, rel, b = rng.choice(sorted(HELD_OUT_RELATIONS))
                # State it in either direction: (a left of b) or (b right of a).
                s1, relation, s2 = (
                    (a, rel, b)
                    if rng.random() < 0.5
                    else (b, {"left of": "right of", "above": "below"}[rel], a)
                )
            elif held_out:
                mention_color = True
        if held_out and category == "color_attr":
            c1, s1 = rng.choice(sorted(HELD_OUT_PAIRS))
            s2 = rng.choice([s for s in SHAPES if s != s1])
        elif held_out and category == "position" and mention_color and rng.random() < 0.5:
            c1, s1 = rng.choice(sorted(HELD_OUT_PAIRS))
        else:
            c1 = rng.choice(_allowed_colors(s1, split))
        c2 = rng.choice(_allowed_colors(s2, split, exclude=(c1,)))
        if rng.random() < 0.5 and category != "position":  # the held-out pair need not come first
            s1, c1, s2, c2 = s2, c2, s1, c1
        specs = [(s1, c1, size()), (s2, c2, size())]
        if (
            split == "train"
            and category == "position"
            and canonical_relation(s1, relation, s2) in HELD_OUT_RELATIONS
        ):
            return None
    else:  # counting
        n = rng.randint(1, MAX_OBJECTS)
        shape = rng.choice(SHAPES)
        colors = _allowed_colors(shape, split)
        if mention_color:
            specs = [(shape, rng.choice(colors), size())] * n
        else:
            specs = [(shape, rng.choice(colors), size()) for _ in range(n)]
        if mention_size:
            specs = [(sh, c, specs[0][2]) for sh, c, _ in specs]
    centres = _place(rng, specs, relation)
    if centres is None:
        return None
    objects = tuple(
        ShapeObject(sh, c, s, round(x, 4), round(y, 4), _rotation(rng, sh))
        for (sh, c, s), (x, y) in zip(specs, centres)
    )
    return Scene(
        objects=objects,
        background=rng.choice(list(BACKGROUNDS)),
        category=category,
        mention_color=mention_color,
        mention_size=mention_size,
        relation=relation,
        template=rng.randrange(12),
    )


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its caption, the scene it describes, its category, and whether it is held out."""

    caption: str
    scene: Scene
    category: str
    held_out: bool


def eval_prompts(n: int, seed: int = 0) -> list[EvalPrompt]:
    """A balanced evaluation set: categories in turn, about half of the colour/position prompts held out."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"the number of prompts must be a positive integer, got {n!r}")
    out = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        held = (i // len(CATEGORIES)) % 2 == 0 if category in ("colors", "color_attr", "position") else False
        scene = sample_scene(derive_seed(seed, i), "eval", category=category, held_out=held)
        out.append(EvalPrompt(scene.caption(), scene, category, scene.is_held_out()))
    return out


def with_objects(scene: Scene, objects) -> Scene:
    """A copy of `scene` with other objects (same caption settings)."""
    return replace(scene, objects=tuple(objects))
