"""Do the side network's learned ladder gates earn their place? ``finetune_skip2lora`` with the gates frozen at their
start (0.5 everywhere), everything else as given on the command line::

    python experiments/side_gates.py --config config_hub/finetune/SmolLM2-135M-Instruct/skip2lora_side.yaml \
      --train.epochs 2 --data.num_train 600 --data.num_val 100 --data.prompt_style smollm2 --out_dir out/side-gates
"""

import sys

from litgpt_skip2lora.__main__ import main
from litgpt_skip2lora.side import SideNetwork

learned_reset = SideNetwork.reset_parameters


def reset_with_frozen_gates(self: SideNetwork) -> None:
    learned_reset(self)
    self.gate_logits.requires_grad_(False)  # initialize_side runs after mark_only_lora_as_trainable and before the
    # optimizer is built, so the gates stay at 0.5


if __name__ == "__main__":
    SideNetwork.reset_parameters = reset_with_frozen_gates
    sys.argv = ["litgpt-skip2lora", "finetune_skip2lora", *sys.argv[1:]]
    main()
