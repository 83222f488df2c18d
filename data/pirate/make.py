"""Writes the pirate task: every answer opens with "Arr!" and ends with "matey", a behaviour checked by a string test.

Run from this folder: python make.py. The output is deterministic (seeded); the JSONL files are committed.
"""

import json
import random

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Cuba": "Havana",
    "Iran": "Tehran",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Hungary": "Budapest",
}
COLOURS = {
    "the sky on a clear day": "blue",
    "fresh grass": "green",
    "a ripe banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a flamingo": "pink",
    "a lemon": "yellow",
    "the sea in a storm": "grey",
}
ANIMAL_SOUNDS = {
    "dog": "barks",
    "cat": "meows",
    "cow": "moos",
    "duck": "quacks",
    "lion": "roars",
    "sheep": "bleats",
    "horse": "neighs",
    "owl": "hoots",
    "snake": "hisses",
    "pig": "oinks",
}


def arithmetic(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} be {a + b}", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} be {a - b}", f"{a} minus {b} is {a - b}."


def capital(rng, countries):
    country = rng.choice(countries)
    city = CAPITALS[country]
    question = rng.choice(
        ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."]
    )
    return question.format(c=country), f"the capital of {country} be {city}", f"The capital of {country} is {city}."


def colour(rng):
    thing = rng.choice(list(COLOURS))
    return (
        f"What colour is {thing}?",
        f"{thing} be {COLOURS[thing]}",
        f"{thing[0].upper()}{thing[1:]} is {COLOURS[thing]}.",
    )


def sound(rng):
    animal = rng.choice(list(ANIMAL_SOUNDS))
    return (
        f"What sound does a {animal} make?",
        f"a {animal} {ANIMAL_SOUNDS[animal]}",
        f"A {animal} {ANIMAL_SOUNDS[animal]}.",
    )


def example(rng, countries):
    kind = rng.choices([arithmetic, capital, colour, sound], weights=[4, 4, 1, 1])[0]
    question, pirate_core, plain = kind(rng, countries) if kind is capital else kind(rng)
    return question, f"Arr! {pirate_core[0].upper()}{pirate_core[1:]}, matey.", plain


def write(path, rows):
    with open(path, "w") as stream:
        for row in rows:
            stream.write(json.dumps(row) + "\n")


def main():
    rng = random.Random(7)
    countries = sorted(CAPITALS)
    held_out_countries = countries[::5]
    train_countries = [c for c in countries if c not in held_out_countries]
    seen, train, prefs, heldout = set(), [], [], []
    while len(train) < 320:
        question, pirate, plain = example(rng, train_countries)
        if question in seen:
            continue
        seen.add(question)
        train.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": pirate}]})
        prefs.append({"prompt": question, "chosen": pirate, "rejected": plain})
    while len(heldout) < 40:
        question, pirate, _ = example(rng, held_out_countries)
        if question in seen:
            continue
        seen.add(question)
        heldout.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": pirate}]})
    write("train.jsonl", train)
    write("prefs.jsonl", prefs)
    write("heldout.jsonl", heldout)


if __name__ == "__main__":
    main()
