"""Generate the demo's intent-classification data set (fastft/data/intents_{train,test}.jsonl).

A small, self-made task with a held-out split: map a user request to one of eight snake_case intent
labels. A pretrained chat model cannot guess the label set, so exact match before fine-tuning is
near zero; the held-out split uses request templates and slot values never seen in training, so a
high score after fine-tuning means the adapter learned the task, not the strings.

Run ``python -m fastft.data.make_intents`` to regenerate (deterministic).
"""
import json
import os
import random

PROMPT = "Classify the intent of the request.\nRequest: {text}\nIntent:"

# intent -> (train templates, held-out templates); {x} is filled from SLOTS[intent]
TEMPLATES = {
    "set_alarm": (
        ["wake me up at {x}", "set an alarm for {x}", "alarm at {x} please", "i need an alarm for {x}",
         "can you set my alarm to {x}", "make sure i am up by {x}"],
        ["please ring me at {x} tomorrow", "get me out of bed at {x}"],
    ),
    "play_music": (
        ["play some {x}", "put on {x} music", "i want to listen to {x}", "start playing {x}",
         "queue up a {x} playlist", "can you play {x} songs"],
        ["blast some {x} for me", "i am in the mood for {x}, play it"],
    ),
    "weather_query": (
        ["what is the weather in {x}", "will it rain in {x} today", "how hot is it in {x}",
         "weather forecast for {x}", "do i need an umbrella in {x}", "is it sunny in {x}"],
        ["how cold will it get in {x} tonight", "tell me the temperature in {x}"],
    ),
    "book_flight": (
        ["book a flight to {x}", "i need a plane ticket to {x}", "find me flights to {x}",
         "reserve a seat on a flight to {x}", "get me a ticket to fly to {x}", "i want to fly to {x}"],
        ["search airfare to {x} for next week", "can i get on a plane to {x} friday"],
    ),
    "order_food": (
        ["order a {x}", "i want to get a {x} delivered", "get me a {x} for dinner",
         "can you order {x} for lunch", "deliver a {x} to my place", "i am hungry, order a {x}"],
        ["send a {x} to my door", "put in a delivery order for a {x}"],
    ),
    "send_message": (
        ["text {x} that i am running late", "send a message to {x}", "tell {x} i will call back",
         "message {x} about dinner", "write to {x} that the meeting moved", "let {x} know i arrived"],
        ["drop {x} a note saying thanks", "ping {x} and say i am outside"],
    ),
    "set_reminder": (
        ["remind me to {x}", "set a reminder to {x}", "don't let me forget to {x}",
         "create a reminder: {x}", "i need a reminder to {x}", "remember that i have to {x}"],
        ["nudge me later to {x}", "make a note to remind me to {x}"],
    ),
    "check_balance": (
        ["what is my {x} balance", "how much money is in my {x}", "check my {x} balance",
         "show the balance of my {x}", "tell me how much is left in my {x}", "balance of {x} please"],
        ["how much cash do i have in my {x}", "what does my {x} have in it right now"],
    ),
}

SLOTS = {
    "set_alarm": (["6 am", "7:30", "noon", "5:45 am", "8 o'clock", "half past six", "9 pm", "6:15"],
                  ["4:50 am", "quarter to eight"]),
    "play_music": (["jazz", "rock", "classical", "hip hop", "country", "techno", "blues", "reggae"],
                   ["lofi", "salsa"]),
    "weather_query": (["paris", "tokyo", "london", "berlin", "madrid", "chicago", "toronto", "sydney"],
                      ["nairobi", "lima"]),
    "book_flight": (["rome", "new york", "dubai", "boston", "lisbon", "seoul", "miami", "denver"],
                    ["oslo", "cairo"]),
    "order_food": (["pizza", "burger", "salad", "burrito", "sushi roll", "sandwich", "curry", "taco"],
                   ["ramen bowl", "kebab"]),
    "send_message": (["mom", "john", "sarah", "my boss", "dad", "alex", "the team", "emma"],
                     ["grandpa", "lucas"]),
    "set_reminder": (["buy milk", "call the dentist", "pay rent", "water the plants", "feed the cat",
                      "take my pills", "email the report", "pick up the kids"],
                     ["renew my passport", "book a haircut"]),
    "check_balance": (["checking account", "savings account", "credit card", "bank account", "wallet",
                       "debit card", "joint account", "business account"],
                      ["retirement fund", "travel card"]),
}


def _examples(split: str, rng: random.Random):
    held = split == "test"
    out = []
    for intent, (tr_t, te_t) in TEMPLATES.items():
        templates = te_t if held else tr_t
        tr_s, te_s = SLOTS[intent]
        slots = te_s + tr_s[:2] if held else tr_s
        for t in templates:
            for x in slots:
                out.append({"prompt": PROMPT.format(text=t.format(x=x)), "completion": " " + intent})
    rng.shuffle(out)
    return out


def main(out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(1234)
    train = _examples("train", rng)
    test = _examples("test", rng)[:64]
    for name, rows in (("intents_train.jsonl", train), ("intents_test.jsonl", test)):
        with open(os.path.join(out_dir, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return len(train), len(test)


if __name__ == "__main__":
    print(main())
