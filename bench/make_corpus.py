"""Writes the fixed retrieval corpus that bench/retrieval.py reads (bench/data/*.jsonl).

Generated text, seeded so the files never change: 240 fictional towns, each one document of
paragraphs about it; each question asks, in other words, for a fact that one paragraph states.
Run it only to change the corpus: `python bench/make_corpus.py`.
"""

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
TOWNS = 240
SYLLABLES = "bar bel cor dun fen gal hol ist jar kel lom mar nor ost pel quin ros sel tar ul ven wyn xan yor zel".split()
FIRST = "Ada Bram Cora Dov Elin Faro Gilda Hugo Ines Joss Kira Lev Mira Niko Oona Pell Rhea Soren Tova Ulf Vesna Wren".split()
GOODS = "wool salt copper honey timber glass cheese silk pottery rope amber paper tea barley".split()
FESTIVALS = "lanterns kites bells masks boats apples drums candles mirrors ribbons".split()
BUILDINGS = "stone mill,round tower,chapel of slate,covered bridge,grain barn,lighthouse,bath house,toll gate".split(",")

# (statement, question): the question paraphrases the statement, as a reader would ask it.
FACTS = [
    ("The main export of {town} is {good}.", "What does {town} mainly sell to other places?"),
    ("{town} was founded in the year {year}.", "When was {town} established?"),
    ("The mayor of {town} is {person}.", "Who leads {town} as its mayor?"),
    ("The river that runs through {town} is called the {river}.", "Which river flows through {town}?"),
    ("Every spring, {town} holds a festival of {festival}.", "What celebration takes place in {town} each spring?"),
    ("The oldest building in {town} is a {building}.", "What is the most ancient structure in {town}?"),
]
FILLER = [
    "The streets of {town} are narrow and paved with uneven cobbles that shine after rain.",
    "Travellers reach {town} by a long road that climbs through pine forest and open meadow.",
    "Winters in {town} are cold and the market closes early when snow falls on the square.",
    "Children in {town} learn to swim in the summer and to skate when the ponds freeze.",
]


def word(rng, parts=2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def main() -> None:
    rng = random.Random(20261125)
    names = set()
    documents, questions = [], []
    while len(names) < TOWNS:
        names.add(word(rng, rng.choice([2, 3])))
    for town in sorted(names):
        values = {
            "town": town,
            "good": rng.choice(GOODS),
            "year": rng.randint(900, 1890),
            "person": f"{rng.choice(FIRST)} {word(rng)}",
            "river": word(rng),
            "festival": rng.choice(FESTIVALS),
            "building": rng.choice(BUILDINGS),
        }
        paragraphs = [s.format(**values) + " " + rng.choice(FILLER).format(**values) for s, _ in FACTS]
        paragraphs += [f.format(**values) for f in rng.sample(FILLER, 2)]
        rng.shuffle(paragraphs)
        name = f"{town.lower()}.md"
        documents.append({"name": name, "text": f"# {town}\n\n" + "\n\n".join(paragraphs) + "\n"})
        for statement, question in rng.sample(FACTS, 2):
            questions.append({"question": question.format(**values), "document": name, "answer": statement.format(**values)})
    DATA.mkdir(exist_ok=True)
    with open(DATA / "corpus.jsonl", "w") as out:
        out.writelines(json.dumps(d) + "\n" for d in documents)
    with open(DATA / "questions.jsonl", "w") as out:
        out.writelines(json.dumps(q) + "\n" for q in questions)
    print(f"{len(documents)} documents, {len(questions)} questions in {DATA}")


if __name__ == "__main__":
    main()
