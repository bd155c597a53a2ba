"""Small generated corpora for tests: a few domains with disjoint vocabularies."""
from __future__ import annotations

import random

VOCABULARIES = {
    "cooking": "flour butter oven simmer garlic onion saucepan whisk dough bake roast pepper salt recipe "
               "skillet broth knead yeast caramel vinegar".split(),
    "astronomy": "galaxy nebula telescope orbit planet comet asteroid redshift quasar stellar parallax "
                 "eclipse supernova pulsar cosmic luminosity spectrum gravity satellite meteor".split(),
    "sailing": "mast keel rudder starboard port hull anchor jib mainsail tack harbour tide compass "
               "mooring bow stern halyard regatta dinghy sextant".split(),
    "finance": "equity bond dividend ledger interest mortgage portfolio hedge liquidity audit invoice "
               "credit debit revenue asset liability capital yield broker".split(),
}


def sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."


def document(rng: random.Random, domain: str, paragraphs: int = 3) -> str:
    words = VOCABULARIES[domain]
    return "\n\n".join(" ".join(sentence(rng, words) for _ in range(4)) for _ in range(paragraphs))


def corpus(n_per_domain: int, domains: list[str] | None = None, seed: int = 0) -> list[dict]:
    """Rows {text, source, work}: one work per document."""
    rng = random.Random(seed)
    rows = []
    for domain in domains or list(VOCABULARIES):
        for i in range(n_per_domain):
            rows.append({"text": document(rng, domain), "source": domain, "work": f"{domain}-{i}"})
    return rows


def write_sharded(folder) -> None:
    """A corpus of five shards in `folder`: four jsonl files of 28 rows (domains mixed, every fifth
    row without a work id, the first row copied into the last file) and eight text files."""
    import json

    rows = corpus(30, seed=3)
    random.Random(0).shuffle(rows)
    for row in rows[::5]:
        del row["work"]  # its own work: its split hangs on its doc id
    folder.mkdir()
    for i in range(4):
        part = rows[i * 28:(i + 1) * 28] + ([rows[0]] if i == 3 else [])
        (folder / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    for i, row in enumerate(rows[112:]):
        (folder / f"note-{i}.txt").write_text(row["text"])
