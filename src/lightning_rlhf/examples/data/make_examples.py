"""Writes the example data of `experiments/byo_files.yaml` (run from the repository root):

  hh_pairs.jsonl       preference pairs, HH-RLHF shape: {"prompt", "chosen", "rejected"} strings
  hh_pairs_chat.jsonl  the same pairs as conversations: {"chosen": [messages], "rejected": [messages]}
  hh_chat.jsonl        demonstrations as conversations: {"messages": [{"role", "content"}, ...]}
  prompts.csv          PPO prompts, one column "prompt"
  tokenizer/           a byte-level BPE tokenizer trained on these texts, with a chat template

The rows are a small hand-written world: a question, a helpful answer (chosen) and an unhelpful or
rude one (rejected). Everything here is deterministic; tests check the committed files match.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (question, helpful answer, unhelpful answer)
ROWS = [
    ("How do I boil an egg?",
     "Put the egg in boiling water for nine minutes, then cool it in cold water before peeling.",
     "Figure it out yourself."),
    ("What is a good way to fall asleep faster?",
     "Keep a regular bedtime, avoid screens for an hour before bed and keep the room cool and dark.",
     "Just stop thinking. It is not hard."),
    ("Can you help me write a birthday message for my sister?",
     "Sure! Happy birthday to the best sister ever, thank you for every laugh and every adventure.",
     "Write it yourself, it is your sister."),
    ("How can I save money on groceries?",
     "Plan your meals for the week, make a list, buy store brands and cook at home more often.",
     "Eat less. Problem solved."),
    ("What should I pack for a day hike?",
     "Bring water, snacks, a map, sunscreen, a light jacket and a small first aid kit.",
     "Nothing, hiking is boring anyway."),
    ("How do I make my houseplants healthier?",
     "Give them bright indirect light, water only when the top of the soil is dry and use a pot with drainage.",
     "Plants die. That is life."),
    ("What is the capital of France?",
     "The capital of France is Paris.",
     "Why would I know that?"),
    ("How do I start learning to play the guitar?",
     "Learn a few basic chords, practice switching between them for ten minutes a day and play simple songs.",
     "You are probably too old to learn."),
    ("Can you explain what a budget is?",
     "A budget is a plan that lists your income and your expenses so you can decide where your money goes.",
     "It is a boring thing rich people do."),
    ("How do I get a stain out of a shirt?",
     "Rinse it with cold water, rub in a little dish soap, let it sit for ten minutes and then wash it.",
     "Throw the shirt away."),
    ("What are some tips for a job interview?",
     "Research the company, prepare a few examples of your work, arrive early and ask thoughtful questions.",
     "Just wing it, nobody prepares."),
    ("How much water should I drink each day?",
     "Many adults do well with about eight glasses a day, more when it is hot or when you exercise.",
     "Drink whatever, it does not matter."),
    ("How can I be more productive when working from home?",
     "Keep a fixed schedule, set up a quiet work space, take short breaks and write a short task list each morning.",
     "Stop being lazy."),
    ("What is a healthy breakfast idea?",
     "Try oatmeal with fruit and nuts, or yogurt with berries and a slice of whole grain toast.",
     "Skip breakfast, who cares."),
    ("How do I change a flat tire?",
     "Loosen the nuts, lift the car with the jack, swap the wheel, tighten the nuts and lower the car.",
     "Call someone, I am not your mechanic."),
    ("Can you recommend a way to relax after work?",
     "A short walk, some stretching or a warm shower can help you unwind after a long day.",
     "Relaxing is a waste of time."),
    ("How do I apologize to a friend?",
     "Tell them honestly what you did wrong, say you are sorry without excuses and ask how you can make it right.",
     "Do not apologize, they will get over it."),
    ("What is photosynthesis?",
     "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
     "Some plant thing, look it up."),
    ("How do I keep my phone battery healthy?",
     "Avoid extreme heat, keep the charge between twenty and eighty percent and use a good charger.",
     "Buy a new phone every year."),
    ("What should I do if I feel stressed?",
     "Take a few slow deep breaths, talk to someone you trust and take a break from what is stressing you.",
     "Everyone is stressed, deal with it."),
    ("How can I improve my writing?",
     "Read often, write a little every day, keep sentences short and ask someone to give you feedback.",
     "Your writing is probably fine, stop asking."),
    ("How do I cook rice?",
     "Rinse one cup of rice, add two cups of water, bring it to a boil, then cover and simmer for fifteen minutes.",
     "Put it in water until it looks done."),
    ("Can you help me plan a small party?",
     "Of course! Pick a date, invite a few friends, plan simple snacks and drinks and make a short playlist.",
     "Parties are loud and annoying."),
    ("How do I learn a new language?",
     "Practice a little every day, learn common words first, listen to native speakers and try to speak early.",
     "You will never be fluent, so why try."),
    ("What is the best way to study for an exam?",
     "Study in short sessions over several days, test yourself with practice questions and get enough sleep.",
     "Cram the night before like everyone else."),
    ("How do I clean a cast iron pan?",
     "Wash it with hot water and a brush, dry it right away and rub in a thin layer of oil.",
     "Put it in the dishwasher."),
    ("How can I make new friends in a new city?",
     "Join a club or a class, say yes to invitations and visit the same cafe or gym so you see familiar faces.",
     "Friends are overrated."),
    ("Why is the sky blue?",
     "Air scatters blue sunlight more than red sunlight, so we see blue light coming from all over the sky.",
     "It just is."),
    ("How do I write a polite email to my teacher?",
     "Start with a greeting, state your question clearly, thank them for their time and sign with your name.",
     "Teachers do not read emails."),
    ("What can I do on a rainy day?",
     "You could read a book, bake something, play a board game or watch a movie with friends.",
     "Sit around and be bored."),
    ("How do I take care of a new puppy?",
     "Feed it regular meals, take it outside often, give it toys to chew and be patient while it learns.",
     "Leave it alone, it will figure things out."),
    ("How do I make a good cup of tea?",
     "Heat fresh water, pour it over the tea, steep for three to five minutes and add milk or honey if you like.",
     "Tea is gross, drink coffee."),
    ("What is a simple way to start exercising?",
     "Start with a twenty minute walk most days and add a few easy strength exercises twice a week.",
     "Exercise is pointless."),
    ("How do I fix a slow computer?",
     "Close programs you do not need, remove unused apps, restart it and check that there is free disk space.",
     "Hit it until it works."),
    ("Can you tell me a fun fact?",
     "Sure! Octopuses have three hearts and blue blood.",
     "No, I am busy."),
    ("How do I thank a coworker for their help?",
     "Tell them what they did and how it helped you, for example: thank you for staying late to help me finish.",
     "Do not thank them, it was their job."),
]

# A few longer conversations for the demonstrations: (system or None, [(user, assistant), ...])
CONVERSATIONS = [
    ("You are a friendly cooking assistant.",
     [("How do I cook rice?", ROWS[21][1]),
      ("And how long should it rest?", "Let it rest, covered, for five minutes, then fluff it with a fork.")]),
    (None,
     [("What should I pack for a day hike?", ROWS[4][1]),
      ("What if it rains?", "Add a rain jacket and keep your phone and map in a plastic bag.")]),
    ("You are a helpful and polite assistant.",
     [("How do I apologize to a friend?", ROWS[16][1])]),
]

SPECIAL = {"pad": "<|pad|>", "eos": "<|end|>", "roles": ["<|system|>", "<|user|>", "<|assistant|>"]}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB_SIZE = 600


def pair_rows() -> list[dict]:
    return [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in ROWS]


def pair_chat_rows() -> list[dict]:
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    return [{"chosen": conv(q, good), "rejected": conv(q, bad)} for q, good, bad in ROWS]


def chat_rows() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]}
            for q, good, _ in ROWS]
    for system, turns in CONVERSATIONS:
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages})
    return rows


def build_tokenizer():
    """Byte-level BPE trained on the example texts; EOS is the end-of-turn token of the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for q, good, bad in ROWS for t in (q, good, bad)]
    texts += [c for system, turns in CONVERSATIONS for t in turns for c in (system or "", *t)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = [SPECIAL["pad"], SPECIAL["eos"], *SPECIAL["roles"]]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL["pad"], eos_token=SPECIAL["eos"],
                                  additional_special_tokens=SPECIAL["roles"], padding_side="left",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(folder: Path = HERE) -> None:
    write_jsonl(folder / "hh_pairs.jsonl", pair_rows())
    write_jsonl(folder / "hh_pairs_chat.jsonl", pair_chat_rows())
    write_jsonl(folder / "hh_chat.jsonl", chat_rows())
    with open(folder / "prompts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt"])
        writer.writerows([q] for q, _, _ in ROWS)
    build_tokenizer().save_pretrained(folder / "tokenizer")


if __name__ == "__main__":
    main()
