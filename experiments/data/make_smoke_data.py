"""Regenerate the tiny synthetic data used by experiments/smoke.yaml (deterministic).

Task A (the fine-tuning task): reverse a word. General data: copy a sentence (a stand-in for
"general text"). Both are learnable by a 2-layer byte-level model in seconds.
"""

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger maple candle orbit silver planet garden violin "
         "harbor lemon copper falcon meadow pencil rocket saddle thunder velvet walnut yellow "
         "anchor breeze cactus dragon ember forest glacier hollow island jungle kettle lantern "
         "marble nectar oyster pepper quartz ribbon spiral tundra umbrella vortex willow zephyr").split()


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    with (here / "smoke_task.jsonl").open("w") as f:
        for _ in range(256):
            w = rng.choice(WORDS) + rng.choice(WORDS)[: rng.randint(0, 4)]
            f.write(json.dumps({"instruction": "Reverse the word.", "input": w,
                                "output": w[::-1]}) + "\n")
    with (here / "smoke_general.jsonl").open("w") as f:
        for _ in range(256):
            s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            f.write(json.dumps({"text": f"The {s} was seen near the {rng.choice(WORDS)}."}) + "\n")


if __name__ == "__main__":
    main()
