"""The intent task as text classification: fastft/data/intents_cls_{train,test}.jsonl.

Each {prompt, completion} row of ``intents_{train,test}.jsonl`` (``make_intents.py``) becomes
``{"text": <the request inside the prompt>, "label": <the intent>}`` -- the same requests, labels
and held-out split, in the format of ``fastft train --task classify``. Used by the encoder example
in the README and by benchmarks/study_forgetting.py.

Run ``python -m fastft.data.make_intent_classification`` to regenerate (deterministic).
"""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def convert(split: str) -> list[dict]:
    out = []
    with open(os.path.join(HERE, f"intents_{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                m = re.search(r"Request: (.*)\nIntent:", r["prompt"])
                out.append({"text": m.group(1), "label": r["completion"].strip()})
    return out


def main():
    for split in ("train", "test"):
        rows = convert(split)
        path = os.path.join(HERE, f"intents_cls_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
